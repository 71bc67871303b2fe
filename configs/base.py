"""The embedded default: binary segmentation of synthetic shapes, offline, on a laptop CPU.

    python train.py --config configs/base.py

A small UNet (base_features=16) on 64x64 grayscale images of the built-in synthetic_shapes
dataset, generated locally on first use. Other configs import this one and override fields.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()

  config.model = ml_collections.ConfigDict(dict(
      in_channels=1, num_classes=1, base_features=16, depth=4, upsample='transpose',
      conv_bias=False,
      # Speed levers: same numbers either way (see README, "Benchmarks").
      transpose_conv='gemm',     # or 'xla'
      conv_weight_grad='auto',   # 'banded' on CPU, 'xla' on GPU; or name one
      max_pool='masks',          # or 'xla'
      bn_relu='fused',           # or 'xla'
      skip_concat='split',       # or 'concat'
      small_maps='gemm',         # or 'xla'
      few_channels='gemm',       # or 'xla'
      wide_convs='auto',         # 'winograd' on CPU, 'xla' on GPU; or name one
      remat=False,               # recompute activations in backward: less memory, same result
      # nnU-Net's deep supervision: 1x1 heads on the decoder's levels at 1/2 .. 1/2**(depth-2)
      # of the size, whose losses against the labels brought to their size add to the loss,
      # weighed 1/2, 1/4, .. of the full size's (normalised); predict uses the full size alone
      deep_supervision=False,
  ))

  config.data = ml_collections.ConfigDict(dict(
      name='synthetic_shapes',   # or 'image_folder', or a TFDS catalog name
      native_size=64,            # synthetic_shapes only: 64, 128 or 480 pixels
      root='',                   # image_folder only: folder with images/ and masks/
      # image_folder only: ROOT/images_dir/NAME{image_suffix}.EXT pairs with
      # ROOT/masks_dir/NAME{mask_suffix}.EXT (milesial/Pytorch-UNet's data/: images_dir='imgs',
      # mask_suffix='_mask' for Carvana; nnU-Net's raw 2D data: images_dir='imagesTr',
      # masks_dir='labelsTr', image_suffix='_0000'; several suffixes, comma-separated, read
      # one gray file per channel: image_suffix='_0000,_0001' for NAME_0000.png, NAME_0001.png)
      images_dir='images', masks_dir='masks', mask_suffix='', image_suffix='',
      # image_folder only, a ROOT without train/ and test/: the share of pairs held out for
      # evaluation, spread evenly over them sorted by name (milesial's --validation)
      holdout_percent=10.0,
      # image_folder only, a ROOT without train/ and test/: k-fold cross-validation instead,
      # fold `fold` (0..num_folds-1) of num_folds contiguous blocks of the pairs sorted by name
      # held out (scikit-learn's KFold without shuffling); one run per fold. 0: off.
      num_folds=0, fold=0,
      # with num_folds: -1 cuts contiguous blocks; a seed shuffles the pairs first, as
      # KFold(shuffle=True, random_state=fold_seed): 12345 gives nnU-Net's folds
      fold_seed=-1,
      data_dir='',               # TFDS data_dir; '' -> $TFDS_DATA_DIR or ~/tensorflow_datasets
      train_split='train',
      eval_split='test',
      image_key='image',
      mask_key='mask',
      mask_offset=0,             # subtracted from mask values (oxford_iiit_pet's trimap is 1..3)
      resample='bilinear',       # PIL's filter resizing images: 'bilinear' or 'bicubic' (masks:
                                 # nearest); predict resizes with the run's
      # How images reach the network: 'unit', scaled to [0, 1]; 'zscore', then each image's
      # channels to zero mean and unit deviation (nnU-Net's default); 'minmax', then each
      # image's channels stretched to [0, 1] (nnU-Net's rescale_to_0_1); 'ct', nnU-Net's CT
      # normalisation: clipped to the 0.5..99.5 percentiles of the training masks' foreground
      # pixels, less their mean, over their deviation (statistics gathered when training
      # starts); before augmentation. Saved with the checkpoint (with the CT statistics):
      # predict, evaluate and export normalise as the run did.
      normalize='unit',
      # normalize='ct': the foreground pixels drawn in all, spread evenly over the cases
      # (nnU-Net's 10e7; fewer take less memory, 4 bytes per pixel and channel)
      ct_samples=10**8,
      # A mask value whose pixels count in neither loss nor metrics (torch's ignore_index; e.g.
      # 255, a void/boundary label; RGB masks: 0xRRGGBB); -1: none. The classes are the others.
      ignore_value=-1,
      # The classes' names in class-id order, for the reports of evaluate (a table of each
      # class's scores); one per class, 2 for a binary model (background, foreground),
      # e.g. ('pet', 'background', 'border'). (): the ids alone.
      class_names=(),
      # Region-based (multi-label) training, as nnU-Net trains BraTS: each output channel the
      # sigmoid of a region, a set of class ids, e.g. ((1, 2, 3), (2, 3), (3,)) for whole
      # tumour, tumour core, enhancing; model.num_classes = the number of regions. Predicted
      # masks paint each region's class in turn (region_class_order, or the one class each
      # region covers that no later one does). (): one class per pixel (softmax, or BCE).
      regions=(),
      region_class_order=(),
      # How the training stream draws examples: 'epochs', the training split shuffled anew for
      # each pass (torch's DataLoader(shuffle=True)); 'replacement', each example drawn
      # uniformly from the split on its own, with replacement (nnU-Net's DataLoader).
      sampling='epochs',
      worker_count=0,            # grain worker processes (0: decode in the main process)
      num_threads=2,             # grain reader threads
  ))
  config.augment = ml_collections.ConfigDict(dict(
      min_scale=0.6, flip_horizontal=True, flip_vertical=True,
      rotate90=False,            # random quarter turns (for data without an up, e.g. aerial)
      # > 0: a random rotation by an angle from [-rotate_degrees, rotate_degrees] (torchvision's
      # RandomRotation): image bilinear, mask nearest; corners black, labelled 0 (or ignored
      # with data.ignore_value)
      rotate_degrees=0.0,
      # (low, high): a size factor drawn from it, > 1 enlarging, < 1 shrinking about the centre,
      # in one resampling with the rotation (torchvision's RandomAffine scale; its fill as the
      # rotation's); (): off. rotate_prob, scale_prob: the share of examples each applies to.
      scale=(), rotate_prob=1.0, scale_prob=1.0,
      # torchvision's ColorJitter: factors drawn from [1 - x, 1 + x]; 0: off
      brightness=0.0, contrast=0.0,
      # (low, high): a gamma drawn from it, MONAI's RandAdjustContrast on the image's range
      # (nnU-Net's (0.7, 1.5)); (): off
      gamma=(),
      # > 0: Gaussian noise of a standard deviation drawn from [0, noise] (MONAI's
      # RandGaussianNoise, e.g. 0.1 on images in [0, 1]); 0: off
      noise=0.0,
      # The share of examples each of those four applies to (nnU-Net's p_per_sample, MONAI's
      # prob); 1: every example.
      brightness_prob=1.0, contrast_prob=1.0, gamma_prob=1.0, noise_prob=1.0,
      # 'jitter': those four as described above; 'nnunet': nnU-Net v2's versions of them
      # (per channel, its order and draws, gamma keeping the mean and deviation; see
      # unet_jax/nnunet_intensity.py), with its gamma of the inverted image for the share
      # inverted_gamma_prob of the examples (nnU-Net's 0.1; 'nnunet' only).
      intensity_recipe='jitter', inverted_gamma_prob=0.0,
      # 'nnunet' only, each between the noise and the brightness, and between the contrast and
      # the gamma, as nnU-Net orders them: (low, high) a Gaussian blur's sigma in pixels (its
      # (0.5, 1.0)), and a scale that each picked channel is shrunk by and brought back from
      # (its low-resolution simulation, (0.5, 1.0)); (): off. The share of examples, then of
      # their channels, that each applies to (nnU-Net's 0.2 and 0.5, 0.25 and 0.5).
      blur=(), blur_prob=1.0, blur_channel_prob=1.0,
      low_resolution=(), low_resolution_prob=1.0, low_resolution_channel_prob=1.0,
      # > 0: the UNet paper's elastic deformation: displacements drawn from N(0, sigma^2)
      # pixels (at image_size, before crop_size's patch) on an elastic_grid x elastic_grid
      # grid over the example, interpolated by cubic splines, the image read by cubic spline
      # and the mask nearest; the paper's sigma 10 and 3x3 grid. elastic_prob: the share of
      # examples deformed.
      elastic_sigma=0.0, elastic_grid=3, elastic_prob=1.0))

  config.image_size = 64
  # (height, width) for images that are not square, e.g. (320, 480) for 2:3 photos (both
  # multiples of 2**model.depth keep every level whole); () -> image_size x image_size.
  config.image_shape = ()
  # > 0: train on random crop_size x crop_size patches of each example (after any resize to
  # image_size / image_shape), at that scale; evaluation, predict and export see whole examples
  # (the UNet is fully convolutional). E.g. image_size=1024, crop_size=256 for large images.
  config.crop_size = 0
  # With crop_size: the share of patches centred on a pixel of a foreground class (a random
  # class, then a random pixel of it), the rest anywhere: nnU-Net's oversampling (0.33), for
  # small objects in large images. 0: all anywhere. As nnU-Net, the last patches of each
  # batch: those at positions round(batch_size * (1 - crop_foreground)) and after.
  config.crop_foreground = 0.0
  # True: each patch draws instead, with probability crop_foreground (nnU-Net's
  # nnUNetTrainer_probabilisticOversampling).
  config.crop_foreground_random = False
  config.batch_size = 16         # global, over all devices and processes
  config.eval_batch_size = 0     # 0 -> batch_size
  # > 1: each step takes its batch in this many microbatches (of batch_size / grad_accum_steps),
  # one after another, and applies their mean gradient: the memory of the smaller batch, the
  # examples per step of the larger (BatchNorm sees each microbatch, as torch's loop does).
  config.grad_accum_steps = 1
  config.num_train_steps = 500
  # > 0: train for this many passes over the training split instead (ceil(num_epochs x training
  # examples / batch_size) steps, replacing num_train_steps; the run's first line says how many).
  config.num_epochs = 0.0

  # PyTorch's semantics throughout (unet_jax/optimizers.py). milesial/Pytorch-UNet's recipe:
  # optimizer='rmsprop', momentum=0.999, weight_decay=1e-8, grad_clip_norm=1.0,
  # learning_rate=1e-5, schedule='plateau', plateau.patience=5, dice_reduction='pooled',
  # dice_smooth=1e-6, eval_include_background=False. nnU-Net's: optimizer='sgd', momentum=0.99,
  # nesterov=True, weight_decay=3e-5, learning_rate=1e-2, schedule='poly',
  # poly_every_steps=250, dice_smooth=1e-5.
  config.optimizer = 'adam'      # 'adam', 'adamw', 'sgd' or 'rmsprop'
  config.learning_rate = 3e-3
  # 'cosine' (cosine decay), 'constant', 'plateau': constant, times plateau.factor whenever
  # the eval Dice has not improved for more than plateau.patience evaluations (torch's
  # ReduceLROnPlateau, mode='max'; its defaults below), or 'poly': learning_rate * (1 - step /
  # num_train_steps) ** poly_power (torch's PolynomialLR; 0.9 is nnU-Net's PolyLRScheduler).
  # Each after warmup_steps of linear warmup from 0 (poly then decays over the steps left).
  config.schedule = 'cosine'
  config.plateau = ml_collections.ConfigDict(dict(
      patience=10, factor=0.1, threshold=1e-4, cooldown=0, min_learning_rate=0.0))
  config.poly_power = 0.9
  # poly: the rate lowered every this many steps, held in between (nnU-Net's: 250, once per
  # epoch of 250 steps, as its PolyLRScheduler steps per epoch); 1: every step.
  config.poly_every_steps = 1
  config.warmup_steps = -1       # -1: the schedule's own, 50 for cosine, none for the others
  config.weight_decay = 0.0      # L2 added to the gradient; adamw: decoupled, as torch's AdamW
  config.momentum = 0.9          # sgd and rmsprop (0: none)
  config.nesterov = False        # sgd: Nesterov momentum, as torch's SGD(nesterov=True)
  config.grad_clip_norm = 0.0    # > 0: clip the global gradient norm, as clip_grad_norm_

  config.loss = 'auto'           # 'bce' (num_classes=1), 'ce' (>=2), 'auto' picks by num_classes
  config.dice_weight = 1.0       # loss = ce_weight * cross-entropy + dice_weight * (1 - soft Dice)
  config.ce_weight = 1.0         # 0: the Dice (Tversky, Lovász) term alone
  # Imbalanced classes, as torch's losses take them: softmax CE's per-class weights
  # (CrossEntropyLoss(weight=...)), one per class, () for none; BCE's foreground weight
  # (BCEWithLogitsLoss(pos_weight=...)).
  config.class_weights = ()
  config.pos_weight = 1.0
  # True: those from the training split's pixel counts instead: class c weighs n / (K n_c)
  # (scikit-learn's 'balanced'; the UNet paper's w_c), BCE's pos_weight n_0 / n_1. Counted
  # once (recorded with the checkpoints, which a resume reuses).
  config.balanced_class_weights = False
  # > 0: focal loss instead of plain cross-entropy, each pixel's term times (1 - p_t)^gamma
  # (p_t: its probability of the true class); 2 is the paper's. The weights above still apply.
  config.focal_gamma = 0.0
  # > 0: the cross-entropy's targets smoothed, as torch's CrossEntropyLoss(label_smoothing=...):
  # 1 - e + e/K for the true class, e/K for each other (BCE: y(1 - e) + e/2). Not with focal.
  config.label_smoothing = 0.0
  # > 0: the UNet paper's weight map (its eq. 2) in the cross-entropy: each background pixel's
  # weight gets border_weight * exp(-(d1 + d2)^2 / (2 border_sigma^2)), d1 and d2 its distances
  # in pixels to the nearest and second nearest object, so that the gaps between touching
  # objects are learnt; the paper's 10 and 5. 0: off.
  config.border_weight = 0.0
  config.border_sigma = 5.0
  # (alpha, beta): the Dice term becomes 1 - the Tversky index, TP / (TP + alpha FP + beta FN)
  # (MONAI's TverskyLoss): beta > alpha, e.g. (0.3, 0.7), costs missed foreground more than
  # false alarms, for small structures. (): the soft Dice.
  config.tversky = ()
  # True: the Dice term becomes the Lovász loss (Berman et al.; segmentation_models_pytorch's
  # LovaszLoss): a surrogate of 1 - IoU, the hinge of the logits for one channel, the
  # Lovász-Softmax over the classes present for several; per image, or over the global batch
  # with dice_reduction='batch' (that library's default).
  config.lovasz = False
  # True: the Dice term is the generalized Dice (Sudre et al.; MONAI's GeneralizedDiceLoss):
  # one ratio over the classes, each weighed by 1 / (its pixels in the truth)^2, so that small
  # classes count as much as large ones. Its smoothing must be small: dice_smooth=1e-5.
  config.generalized_dice = False
  # 'image': the Dice term's soft counts per image and class (MONAI's DiceLoss default);
  # 'batch': summed over the global batch (each microbatch) per class first: MONAI's
  # DiceLoss(batch=True), as segmentation_models_pytorch reduces it; 'pooled': summed over the
  # classes too, one Dice (milesial/Pytorch-UNet's dice_loss; for 1 class the same as 'batch').
  config.dice_reduction = 'image'
  # Several classes: whether class 0 (the background) counts in the Dice (Tversky) term. False:
  # MONAI's DiceLoss(include_background=False), nnU-Net's Dice term (do_bg=False); the
  # cross-entropy still covers every class.
  config.dice_include_background = True
  # The Dice (Tversky) term's additive smoothing, in pixels: (2 TP + s) / (P + T + s), so that
  # a class absent from an image and its prediction scores 1 (MONAI's smooth_nr = smooth_dr =
  # 1). nnU-Net's is 1e-5, milesial/Pytorch-UNet's 1e-6: with little smoothing, a class absent
  # from the truth weighs its false alarms fully.
  config.dice_smooth = 1.0
  # > 0: also keep an exponential moving average of the weights (BatchNorm statistics too),
  # ema = decay * ema + (1 - decay) * weights after each step, and evaluate, save for use and
  # convert that (timm's ModelEmaV2); e.g. 0.999. 0: none.
  config.ema_decay = 0.0
  config.half_precision = False  # bfloat16 compute, float32 params and BatchNorm statistics

  config.log_every_steps = 50
  config.eval_every_steps = 100
  config.checkpoint_every_steps = 100
  config.keep_checkpoints = 2
  config.num_sample_images = 4   # held-out examples drawn in each eval PNG
  # Several classes: whether class 0 (the background) counts in eval_dice, eval_iou and
  # eval_class_accuracy, the means over classes (and so in the best checkpoint, the plateau and
  # early stopping). True: MONAI's default; False: MONAI's include_background=False, milesial's
  # evaluate.py. Each class's own score is logged either way.
  config.eval_include_background = True
  # > 0: stop (and save) once the eval Dice has not improved for this many evaluations in a row
  config.early_stop_patience = 0
  config.on_nonfinite = 'skip'   # non-finite loss/gradient: 'skip' the update, or 'stop' the run
  # (first, last): trace those steps with JAX's profiler into WORKDIR/plugins/profile, for
  # TensorBoard's Profile tab or ui.perfetto.dev (unet_jax/profiling.py); (): none
  config.profile_steps = ()
  # Start from these weights instead of random ones (fine-tuning): a PyTorch state_dict file, a
  # converted checkpoint directory or a training workdir, its model fields equal to
  # config.model's. A resumed run takes its own checkpoint's weights instead.
  config.init_from = ''
  # With init_from: draw the output layer (out_conv) anew instead of taking the file's, to
  # fine-tune weights trained for another number of classes (the other model fields must match).
  config.init_new_head = False
  # Modules left as they are (fine-tuning), as torch's requires_grad_(False) leaves them: no
  # update, weight decay or optimizer state, out of the clipping norm; BatchNorm's running
  # statistics still update. Names: 'encoder' (in_conv, down1..), 'decoder' (up1.., deep
  # supervision's heads), or modules: in_conv, down1.., up1.., out_conv. E.g. ('encoder',).
  config.freeze = ()
  # True: the frozen modules' BatchNorms also run as in evaluation while training, normalising
  # by their running statistics and keeping them (torch's frozen_module.eval() after
  # model.train(); for fine-tuning on small batches).
  config.freeze_batch_norm = False
  # ((module or 'encoder'/'decoder', multiplier), ...): those modules' learning rate is the
  # schedule's times the multiplier (torch's parameter groups), e.g. (('encoder', 0.1),) to
  # fine-tune pretrained weights gently below a faster decoder. (): one rate for all.
  config.lr_multipliers = ()
  config.seed = 0
  config.parallel = 'shard_map'  # or 'pmap'
  config.cpu_scheduler = 'memory'  # XLA's CPU op order: 'memory' (less RAM) or 'concurrency'
  # Compiled steps kept on disk: a rerun or resume loads them instead of compiling. '' turns it
  # off; the environment's JAX_COMPILATION_CACHE_DIR, when set, is used instead.
  config.compilation_cache_dir = '~/.cache/unet_jax/jax'
  return config
