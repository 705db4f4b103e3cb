"""The GDAL face: what GDAL's /vsigs/ caches hold and clearing just that; cloudio.open, raster writes, VRTs."""
