"""The seed article's own setting: 1x480x480 grayscale, batch 10, the full transposed-conv UNet.

    python train.py --config configs/seed.py

Heavy on a CPU (about 31M parameters at 480x480); meant for a GPU host.
"""

from configs import base


def get_config():
  config = base.get_config()
  config.model.base_features = 64
  config.model.upsample = 'transpose'
  config.data.native_size = 480
  config.image_size = 480
  config.batch_size = 10
  config.num_train_steps = 2000
  config.learning_rate = 1e-3
  config.log_every_steps = 10
  config.eval_every_steps = 200
  config.checkpoint_every_steps = 200
  return config
