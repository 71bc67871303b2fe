"""nnU-Net's 2D training recipe on its raw data folder as it lies, one fold per run.

    python train.py --config configs/nnunet.py --config.data.root=DatasetXXX_Name \
        --config.data.fold=0 --workdir workdirs/fold0

imagesTr/NAME_0000.png with labelsTr/NAME.png (one image file per case, as nnU-Net reads
natural 2D images; RGB here, set model.in_channels=1 for gray, and model.num_classes to the
number of labels; for one gray file per channel, NAME_0000.png, NAME_0001.png, ..., as its
dataset.json's channel_names count them, --config.data.image_suffix=_0000,_0001 and
--config.model.in_channels=2); nnU-Net's five folds (KFold over the sorted case names,
shuffled with seed 12345: its splits_final.json), `data.fold` 0..4 for each run, which `evaluate
--cross_validation` pools; SGD with Nesterov momentum 0.99, weight decay 3e-5, learning rate
1e-2 lowered as (1 - epoch / epochs) ** 0.9 at the start of each epoch of 250 steps, gradients
clipped at norm 12; cross-entropy plus the soft Dice of the classes but 0 (do_bg=False) over
the whole batch (its 2D plans' batch_dice), smoothed by 1e-5; 1000 epochs of 250 steps,
each batch's examples drawn with replacement (data.sampling='replacement');
each image's channels normalised to mean 0 and deviation 1 (its ZScoreNormalization, the
default for channels not named 'CT' or 'rgb_to_0_1'; for a CT dataset, its channels named 'CT',
--config.data.normalize=ct: its CTNormalization by the foreground's statistics, training warns
where dataset.json names them); mirroring on both axes; its intensity
augmentations, in its order, each per channel with its
draws (unet_jax/nnunet_intensity.py), after rotations by any angle and scaling by a factor in
[1/1.4, 1/0.7] (20% of the examples each): Gaussian noise of a deviation up to 0.1 (10% of the
examples), Gaussian blur of a sigma in [0.5, 1] for each axis (20%; each channel with
probability 1/2), brightness and contrast factors in [0.75, 1.25] (15% each), low-resolution
simulation at a scale in [0.5, 1] (25%; each channel with probability 1/2), gamma in [0.7, 1.5]
of the inverted image (10%) and of the image (30%), keeping its mean and deviation; the
held-out Dice over the classes but 0; deep supervision (heads on the decoder's levels, their
losses weighed 1/2, 1/4, .. against the labels downsampled as its nearest-exact).
Differences left:
- the network is the classic UNet (BatchNorm, ReLU, max-pooling, transposed convs), not
  nnU-Net's PlainConvUNet (InstanceNorm, LeakyReLU, strided convs);
- examples are resized to image_size (or image_shape) here, where nnU-Net keeps 2D images at
  their size; its planning picks the patch and batch size from the data and the GPU: set
  crop_size and batch_size (16 here) for yours, and with crop_size, crop_foreground=0.33 for
  its oversampling (the last third of each batch's patches centred on a foreground class);
- its rotations and scaling sample a patch from the image around it; here the turned or shrunk
  example brings in corners from outside, labelled 0 (or data.ignore_value's label), which are
  0 after the normalisation as nnU-Net's padding is, and count in none of its statistics; but
  the bilinear turn blends the edge with black before it; and its scaling factor is drawn
  uniformly, where here its inverse is (over the same range);
Its inference: `python -m unet_jax.predict imagesTs/ --checkpoint workdirs/fold0 ... --checkpoint
workdirs/fold4 --tile PATCH --blend gaussian --tta --image_suffix _0000 --mask_suffix ''` (its
sliding window over each image at the run's size, padded to the tile where smaller, its
mirroring, the folds' ensemble), PATCH the
run's crop_size.
"""

from configs import folder


def get_config():
  config = folder.get_config()
  config.data.images_dir = 'imagesTr'
  config.data.masks_dir = 'labelsTr'
  config.data.image_suffix = '_0000'
  config.data.num_folds = 5
  config.data.fold_seed = 12345
  config.model.in_channels = 3
  config.model.num_classes = 2
  config.model.base_features = 32
  config.model.deep_supervision = True
  config.image_size = 256
  config.augment.min_scale = 1.0
  config.augment.flip_horizontal = True
  config.augment.flip_vertical = True
  config.augment.brightness = 0.25
  config.augment.contrast = 0.25
  config.augment.gamma = (0.7, 1.5)
  config.augment.noise = 0.1
  # Each to its share of the examples, as nnU-Net's apply_probability
  config.augment.brightness_prob = 0.15
  config.augment.contrast_prob = 0.15
  config.augment.gamma_prob = 0.3
  config.augment.noise_prob = 0.1
  config.augment.intensity_recipe = 'nnunet'  # (its formulas, order and draws)
  config.data.sampling = 'replacement'  # (its DataLoader's np.random.choice(replace=True))
  config.data.normalize = 'zscore'  # (its default for channels not named CT or rgb_to_0_1)
  config.augment.inverted_gamma_prob = 0.1
  # Its rotations (any angle, for square 2D patches) and scaling, each for 20% of the examples;
  # its factors (0.7, 1.4) scale the region sampled (larger: smaller objects), so here the
  # size factor's range is their inverse, (1 / 1.4, 1 / 0.7).
  config.augment.rotate_degrees = 180.0
  config.augment.rotate_prob = 0.2
  config.augment.scale = (1 / 1.4, 1 / 0.7)
  config.augment.scale_prob = 0.2
  config.augment.blur = (0.5, 1.0)
  config.augment.blur_prob = 0.2
  config.augment.blur_channel_prob = 0.5
  config.augment.low_resolution = (0.5, 1.0)
  config.augment.low_resolution_prob = 0.25
  config.augment.low_resolution_channel_prob = 0.5
  config.batch_size = 16
  config.num_train_steps = 1000 * 250
  config.log_every_steps = 250
  config.eval_every_steps = 2500
  config.checkpoint_every_steps = 2500
  config.optimizer = 'sgd'
  config.momentum = 0.99
  config.nesterov = True
  config.weight_decay = 3e-5
  config.learning_rate = 1e-2
  config.schedule = 'poly'
  config.poly_power = 0.9
  config.poly_every_steps = 250  # (lowered once per epoch, at its start)
  config.grad_clip_norm = 12.0
  config.loss = 'ce'
  config.dice_weight = 1.0
  config.dice_reduction = 'batch'
  config.dice_smooth = 1e-5  # (its MemoryEfficientSoftDiceLoss's smooth)
  config.dice_include_background = False
  config.eval_include_background = False
  return config
