"""milesial/Pytorch-UNet's training recipe, on its data/ folder as it lies.

    python train.py --config configs/milesial.py --config.data.root=data

data/imgs/NAME.jpg with data/masks/NAME_mask.gif (Carvana's layout), its train.py defaults:
5 epochs, batch 1, learning rate 1e-5, 10% held out, 2 classes (softmax cross-entropy plus one
Dice over the batch and the classes), RMSprop with momentum 0.999 and weight decay 1e-8,
gradients clipped at norm 1, the rate lowered 10x once the held-out Dice (classes but 0) has
not improved for 5 evaluations, no augmentation, images at half size (its --scale 0.5: Carvana's
1918x1280 at 959x640). Set image_shape for other data, e.g. --config.image_shape='(320,480)'.
milesial evaluates 5 times per epoch: set eval_every_steps to a fifth of an epoch's steps (the
first line of the run says how many training images there are).
Differences left: its 10% are drawn at random, here spread evenly by name.
"""

from configs import folder


def get_config():
  config = folder.get_config()
  config.data.images_dir = 'imgs'
  config.data.mask_suffix = '_mask'
  config.data.holdout_percent = 10.0
  config.model.in_channels = 3
  config.model.num_classes = 2
  config.model.base_features = 64
  config.image_shape = (640, 959)
  config.data.resample = 'bicubic'
  config.augment.min_scale = 1.0
  config.augment.flip_horizontal = False
  config.augment.flip_vertical = False
  config.batch_size = 1
  config.num_epochs = 5.0
  config.eval_every_steps = 500
  config.checkpoint_every_steps = 500
  config.optimizer = 'rmsprop'
  config.learning_rate = 1e-5
  config.momentum = 0.999
  config.weight_decay = 1e-8
  config.grad_clip_norm = 1.0
  config.schedule = 'plateau'
  config.plateau.patience = 5
  config.dice_reduction = 'pooled'
  config.dice_smooth = 1e-6  # (its dice_coeff's epsilon)
  config.eval_include_background = False
  return config
