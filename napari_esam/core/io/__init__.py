"""Label files: export to OME-Zarr and TIFF, and reading them back."""
