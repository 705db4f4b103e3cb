"""The Zarr face: the journaled store, Xarray and NumPy/Dask entry points, shard safety and the shard codec."""
