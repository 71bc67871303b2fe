"""TFDS builders shipped with unet-jax, prepared as array_record and read with tfds.data_source."""
