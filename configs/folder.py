"""Your own images and masks: ROOT/images/NAME.png with ROOT/masks/NAME.png.

    python train.py --config configs/folder.py --config.data.root=/path/to/ROOT \
        --config.model.in_channels=3 --config.model.num_classes=2

Mask values are mapped to class ids in sorted order (the mapping is saved with the checkpoint).
For two classes (background + one), num_classes=1 trains a binary model with BCE.
milesial/Pytorch-UNet's data/imgs/NAME.jpg with data/masks/NAME_mask.gif: add
--config.data.images_dir=imgs --config.data.mask_suffix=_mask.
"""

from configs import base


def get_config():
  config = base.get_config()
  config.data.name = 'image_folder'
  config.data.root = ''
  config.model.base_features = 32
  config.image_size = 128
  config.batch_size = 8
  config.num_train_steps = 2000
  config.learning_rate = 1e-3
  return config
