"""Oxford-IIIT Pet from the TFDS catalog: RGB images, 3-class trimaps (pet, background, border).

    python train.py --config configs/oxford_pets.py

Needs the dataset prepared once as array_record (this step needs TensorFlow and a network):
    pip install tensorflow && tfds build oxford_iiit_pet --file_format=array_record
"""

from configs import base


def get_config():
  config = base.get_config()
  config.model.in_channels = 3
  config.model.num_classes = 3
  config.model.base_features = 32
  config.data.name = 'oxford_iiit_pet'
  config.data.mask_key = 'segmentation_mask'
  config.data.mask_offset = 1       # trimap values 1, 2, 3 -> class ids 0, 1, 2
  config.image_size = 128
  config.batch_size = 16
  config.num_train_steps = 5000
  config.learning_rate = 1e-3
  config.eval_every_steps = 500
  config.checkpoint_every_steps = 500
  return config
