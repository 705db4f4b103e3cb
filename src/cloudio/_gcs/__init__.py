"""The GCS client: gcsfs filesystems for the endpoint in force, and verified transfers."""
