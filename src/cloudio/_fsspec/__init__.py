"""The fsspec face: tracked gcsfs filesystems and fresh listings in every live instance."""
