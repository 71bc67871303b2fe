"""DatasetInfo for the builders shipped here, which tfds never publishes on its GCS bucket."""

from __future__ import annotations

import tensorflow_datasets as tfds


class LocalDatasetInfo(tfds.core.DatasetInfo):
  """A DatasetInfo that skips tfds's lookup of pre-computed info on GCS.

  tfds looks there whenever a builder is made for a dataset not yet prepared, and before its
  (disabled) GCS check it makes an empty temporary directory that it never removes: one left in
  /tmp per first preparation. These datasets have nothing on GCS to find."""

  def initialize_from_bucket(self) -> None:
    pass
