"""TFDS data sources -> grain pipelines: augmentation, batching, per-process slices.

The order of examples is a pure function of (seed, global position): global batch b holds
positions [b*G, (b+1)*G) of an endless sequence of per-epoch permutations, and process p reads
only its slice [p*L, (p+1)*L) of each global batch (L = G / processes). Augmentation randomness
is keyed on the same global position. So 1 process x 4 devices and 2 processes x 2 devices see
the very same global batches, and a run resumed from the checkpoint of step s reads on from
global batch s, whatever devices, processes or grain workers the run before it had.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import math
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grain
import jax
import ml_collections
import numpy as np

from unet_jax import border_weights, elastic
from unet_jax.ct_normalization import (
  CT_SAMPLES,
  CTStatistics,
  foreground_statistics,
  recorded_normalization,
)
from unet_jax.errors import UserError, first_line
from unet_jax.image_io import (
  height_width,
  mask_value_text,
  normalized,
  peak_value,
  resample_filter,
  resize,
  sixteen_bit_plane,
  training_size,
  unit_scaled,
)
from unet_jax.regions import config_regions, label_count


@dataclasses.dataclass(frozen=True)
class DataInfo:
  name: str
  num_train: int
  num_eval: int
  channels: int
  mask_values: list  # the classes' mask values, in class-id order (an ignored one left out)
  splits: tuple[str, ...] = ()
  ignore_id: int | None = None  # the label id of data.ignore_value's pixels, if any
  mask_palette: list = dataclasses.field(default_factory=list)  # palette masks' colours, or []
  lossy_mask: str = ''  # a JPEG mask of the dataset, if any
  class_names: tuple[str, ...] = ()  # the classes' names, where the dataset gives them

  def too_many_mask_values(self, classes: str) -> str:
    """The line for masks holding more values than `classes` (the model's, in words) allows."""
    line = (f'dataset {self.name!r} masks hold {len(self.mask_values)} values '
            f'{self.mask_values[:8]} but {classes}')
    if self.lossy_mask:  # (then the values are more likely JPEG's than classes)
      return (f'{line}: {self.lossy_mask} is a JPEG mask, and JPEG compression blends labels '
              'into new values at every edge; save the masks losslessly (PNG)')
    return line


def _data_dir(config: ml_collections.ConfigDict) -> str:
  return os.path.expanduser(config.data.data_dir or os.environ.get(
      'TFDS_DATA_DIR', '~/tensorflow_datasets'))


def _prepared(make_builder: Callable[[], Any], process_count: int, what: str) -> Any:
  """A local builder, prepared: process 0 prepares it (saying so, the first time: `what` names
  the data); the others wait, then make theirs again, which finds the prepared files (the
  builder made before them knows no splits: the second process of a run on an image folder
  stopped at "has no split 'train'"). Each makes one first, so that a refusal (a missing
  folder, a mask without an image) stops every process rather than leaving the others
  waiting."""
  from unet_jax.datasets.local_preparation import prepare, quiet_tfds_notices
  with quiet_tfds_notices():
    builder = make_builder()
    if jax.process_index() == 0:
      prepare(builder, what)
    if process_count > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices('unet_jax: dataset prepared')
    if jax.process_index() != 0:
      builder = make_builder()
  return builder


def load_sources(config: ml_collections.ConfigDict) -> tuple[Any, Any, DataInfo]:
  """(train source, eval source, info). Prepares built-in datasets on first use."""
  import tensorflow_datasets as tfds
  name = config.data.name
  data_dir = _data_dir(config)
  if name == 'synthetic_shapes':
    from unet_jax.datasets.synthetic_shapes import SyntheticShapes
    sizes = [int(c.name[:-2]) for c in SyntheticShapes.BUILDER_CONFIGS]
    if config.data.native_size not in sizes:
      raise UserError(f'data.native_size={config.data.native_size}: synthetic_shapes comes in '
                      f"{', '.join(map(str, sizes))} pixels")
    builder = _prepared(lambda: SyntheticShapes(config=f'{config.data.native_size}px',
                                                data_dir=data_dir, file_format='array_record'),
                        jax.process_count(), f'synthetic_shapes ({config.data.native_size}px)')
  elif name == 'image_folder':
    from unet_jax.datasets.image_folder import FolderLayout, ImageFolder
    layout = FolderLayout(**{f: config.data.get(f, getattr(FolderLayout, f))
                             for f in ('images_dir', 'masks_dir', 'mask_suffix', 'image_suffix',
                                       'holdout_percent', 'num_folds', 'fold', 'fold_seed')})
    if not config.data.root:
      raise UserError('config.data.root is empty: set --config.data.root=/path/to/folder with '
                      f'{layout.images_dir}/ and {layout.masks_dir}/')
    builder = _prepared(lambda: ImageFolder(root=config.data.root, layout=layout,
                                            data_dir=data_dir, file_format='array_record'),
                        jax.process_count(), f'the image folder {config.data.root}')
  else:
    try:
      builder = tfds.builder(name, data_dir=data_dir, file_format='array_record')
    except Exception as e:  # tfds raises several types for unknown names
      raise UserError(f'unknown dataset {name!r} ({first_line(e, 120)})') from None
    if not builder.is_prepared():
      raise UserError(
          f'dataset {name!r} is not prepared in {data_dir}; prepare it once (it needs TensorFlow '
          f"and a network): pip install tensorflow && tfds build {name} "
          f'--file_format=array_record --data_dir {data_dir}')
  sources = builder.decoded_sources() if name == 'image_folder' else builder.as_data_source()
  for field in ('train_split', 'eval_split'):
    if config.data[field] not in sources:
      raise UserError(f'dataset {name!r} has no split {config.data[field]!r} (it has '
                      f"{', '.join(sorted(sources))}); set --config.data.{field}")
  train = sources[config.data.train_split]
  evaluation = sources[config.data.eval_split]
  record = train[0]
  for field in ('image_key', 'mask_key'):
    if config.data[field] not in record:
      raise UserError(f'dataset {name!r} has no feature {config.data[field]!r} (it has '
                      f"{', '.join(sorted(record))}); set --config.data.{field}")
  first = _adapt(config, record)
  metadata = builder.info.metadata or {}  # (image_folder lists its mask values there)
  mask_values = list(metadata.get('mask_values', []))
  ignore_id = _ignored_label(config, name, mask_values)
  if mask_values and ignore_id is not None:
    mask_values.pop(ignore_id)
  if not mask_values:
    mask_values = list(range(label_count(config)))
  class_names = ()
  if name == 'image_folder':  # (nnU-Net's dataset.json names its labels)
    from unet_jax.datasets.image_folder import dataset_json_class_names
    class_names = dataset_json_class_names(config.data.root, mask_values)
  info = DataInfo(name=name, num_train=len(train), num_eval=len(evaluation),
                  channels=first['image'].shape[-1], mask_values=mask_values,
                  splits=tuple(sorted(sources)), ignore_id=ignore_id,
                  mask_palette=list(metadata.get('mask_palette', [])),
                  lossy_mask=metadata.get('lossy_mask', ''), class_names=class_names)
  return train, evaluation, info


def _ignored_label(config: ml_collections.ConfigDict, name: str, mask_values: list) -> int | None:
  """The label id that data.ignore_value's pixels have after _adapt, or None.

  A dataset that lists its mask values (image_folder) has label ids = their positions (RGB
  values compare as 0xRRGGBB); others have label ids = mask values - data.mask_offset."""
  value = config.data.get('ignore_value', -1)
  if value < 0:
    return None
  if mask_values:
    from unet_jax.datasets.image_folder import mask_value_key
    packed = [mask_value_key(v) for v in mask_values]
    if value not in packed:
      raise UserError(f'data.ignore_value={value} is not a mask value of dataset {name!r} (its '
                      f'masks hold {mask_values[:8]}; RGB values as 0xRRGGBB)')
    return packed.index(value)
  label = value - config.data.mask_offset
  if not 0 <= label <= 255:
    raise UserError(f'data.ignore_value={value} minus data.mask_offset='
                    f'{config.data.mask_offset} is not a mask value of 0..255')
  return label


def _adapt(config: ml_collections.ConfigDict, record: dict[str, Any]) -> dict[str, np.ndarray]:
  """A source record -> {'image': uint8 (16-bit gray: uint16) HxWxC, 'mask': uint8 HxW class
  ids}."""
  image = np.asarray(record[config.data.image_key])
  mask = np.asarray(record[config.data.mask_key])
  if mask.ndim == 3:
    mask = mask[..., 0]
  if image.ndim == 2:
    image = image[..., None]
  if config.data.mask_offset:
    mask = mask.astype(np.int32) - config.data.mask_offset
    if mask.min() < 0:  # would wrap to 255 as uint8 and train on it silently
      raise UserError(f'data.mask_offset={config.data.mask_offset} takes mask value '
                      f'{mask.min() + config.data.mask_offset} to {mask.min()}, below 0; set it '
                      'to the smallest mask value (or 0)')
  return {'image': image, 'mask': mask.astype(np.uint8)}


def stored_masks(config: ml_collections.ConfigDict, source: Sequence[Any]
                 ) -> Iterator[np.ndarray]:
  """The source's masks as stored (label ids, before any resize), one by one."""
  return (_adapt(config, source[i])['mask'] for i in range(len(source)))


def class_names(config: ml_collections.ConfigDict, info: DataInfo) -> tuple[str, ...]:
  """The classes' names for reports: the config's `data.class_names`, else the dataset's
  (an image folder's dataset.json) where they name each of the model's classes; else ()."""
  names = tuple(config.data.get('class_names', ()))  # (runs before the field: none)
  # (A dataset's names are its labels', not regions': config_regions.)
  if not names and len(info.class_names) == max(config.model.num_classes, 2) and \
      not config_regions(config):
    names = info.class_names
  return names


_LISTED_CLASSES = 16  # (a class map longer than this is cut, its count said)


def class_map_line(info: DataInfo, names: Sequence[str]) -> str:
  """Which mask value trains as which class, for people: 'classes by mask value: #000000 -> 0
  background, #ff0000 -> 1 car'. An image folder's classes are its sorted values, which the
  names given must follow; the line shows whether they do."""
  pairs = [f'{mask_value_text(value, info.mask_palette)} -> {k}'
           + (f' {names[k]}' if k < len(names) else '')
           for k, value in enumerate(info.mask_values)]
  return ('classes by mask value: ' + ', '.join(pairs[:_LISTED_CLASSES])
          + (f', ... ({len(pairs)} classes)' if len(pairs) > _LISTED_CLASSES else ''))


def image_hw(config: ml_collections.ConfigDict) -> tuple[int, int]:
  """The (height, width) examples are resized to: image_shape, else image_size square."""
  return height_width(training_size(config))


def train_hw(config: ml_collections.ConfigDict) -> tuple[int, int]:
  """(height, width) of the training examples: crop_size's patches, or the whole image_hw."""
  crop = config.get('crop_size', 0)
  return (crop, crop) if crop else image_hw(config)


def image_normalization(config: ml_collections.ConfigDict) -> str | CTStatistics:
  """data.normalize ('unit' for runs before the field); for 'ct', the run's CTStatistics."""
  return recorded_normalization(config.data)


def ct_statistics(config: ml_collections.ConfigDict, train_source: Any,
                  ignore_id: int | None = None) -> CTStatistics:
  """nnU-Net's statistics of the training cases' foreground for data.normalize='ct'
  (ct_normalization.foreground_statistics): of an image folder whose held-out pairs are cut
  from its own (a share or a fold), of all its pairs, as nnU-Net's fingerprint takes all of
  imagesTr, so that every fold of a cross-validation normalises alike (and ensembles).
  `ignore_id`: the ignored label's id (DataInfo's), which moves class 0 to label 1 when it is
  0."""
  source = train_source.all_pairs() if hasattr(train_source, 'all_pairs') else train_source
  examples = (_adapt(config, source[i]) for i in range(len(source)))
  return foreground_statistics(((unit_scaled(e['image']), e['mask']) for e in examples),
                               len(source), config.data.get('ct_samples', CT_SAMPLES),
                               background=1 if ignore_id == 0 else 0)


def image_resample(config: ml_collections.ConfigDict) -> str:
  """The filter images are resized with (data.resample: 'bilinear' or 'bicubic')."""
  return config.data.get('resample', 'bilinear')


def preprocess(example: dict[str, np.ndarray], image_size: int | Sequence[int],
               rng: np.random.Generator | None, aug: ml_collections.ConfigDict | None,
               resample: str = 'bilinear', fill_label: int = 0, crop: int = 0,
               crop_foreground: float = 0.0, normalize: str | CTStatistics = 'unit',
               border: tuple[float, float] | None = None, ignore_id: int | None = None,
               ) -> dict[str, np.ndarray]:
  """Random scale-crop, flips, quarter turns, rotation and scaling (when `rng` is given), resize to
  `image_size` (a square's side, or (height, width); the image with PIL's `resample` filter, the
  mask with nearest), a random `crop` x `crop` patch of that (training's crop_size; 0: the whole;
  with probability `crop_foreground` centred on a pixel of a foreground class, nnU-Net's
  oversampling), scale to [0, 1] (8 bits from 255, 16-bit gray from 65535; `normalize='zscore'`:
  then each channel to mean 0 and deviation 1 over the whole resized image, as nnU-Net normalises a
  case before it cuts its patches; 'minmax': each channel stretched to [0, 1] so; a run's
  CTStatistics: nnU-Net's CT normalisation), random brightness and contrast, gamma, Gaussian noise
  (not clipped, as MONAI's); `elastic_sigma` > 0: the UNet paper's elastic deformation
  (elastic.py) at the training size, before the patch. The corners a rotation brings in are
  black with mask label `fill_label` (0, or the ignored label); with a `normalize` other than
  'unit', 0 after it and left out of its statistics, as nnU-Net pads its normalised image
  (`normalized`'s `inside`). `border` (w0, sigma): the example gets a 'weight' map too, the
  UNet paper's separation term (border_weights.py) of its mask at the training size (the
  mask's ignored id `ignore_id`), cut as the patch is.

  Each optional augmentation draws from `rng` only when it is on, so turning one on leaves the
  draws of the others, and a stream without it, as they were."""
  from PIL import Image
  image, mask = example['image'], example['mask']
  peak = np.float32(peak_value(image.dtype))  # (uint16, 16-bit gray: 65535; stays uint16 below)
  augment = rng is not None and aug is not None
  inside = None  # where a rotation or scaling kept the image (None: everywhere)
  if augment:
    h, w = mask.shape
    scale = rng.uniform(aug.min_scale, 1.0)
    ch, cw = max(1, round(h * scale)), max(1, round(w * scale))
    y0, x0 = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    image, mask = image[y0:y0 + ch, x0:x0 + cw], mask[y0:y0 + ch, x0:x0 + cw]
    if aug.flip_horizontal and rng.random() < 0.5:
      image, mask = image[:, ::-1], mask[:, ::-1]
    if aug.flip_vertical and rng.random() < 0.5:
      image, mask = image[::-1], mask[::-1]
    if aug.get('rotate90', False):
      k = int(rng.integers(0, 4))  # counter-clockwise quarter turns
      image, mask = np.rot90(image, k), np.rot90(mask, k)
    image, mask = np.ascontiguousarray(image), np.ascontiguousarray(mask)
    angle, zoom = 0.0, 1.0  # (torchvision's RandomAffine order: the angle, then the scale)
    if aug.get('rotate_degrees', 0.0):
      applied = applies(rng, aug.get('rotate_prob', 1.0))
      drawn = float(rng.uniform(-aug.rotate_degrees, aug.rotate_degrees))
      angle = drawn if applied else 0.0
    if aug.get('scale', ()):
      applied = applies(rng, aug.get('scale_prob', 1.0))
      drawn = float(rng.uniform(*aug.scale))
      zoom = drawn if applied else 1.0
    if angle or zoom != 1.0:
      if normalize != 'unit':  # (where the image was: the corners come in after normalising)
        inside = rotate(image[..., :1], np.ones(mask.shape, np.uint8), angle, 0, scale=zoom)[1]
      image, mask = rotate(image, mask, angle, fill_label, scale=zoom)
  height, width = height_width(image_size)
  image = resize(image, height, width, resample_filter(resample))
  mask = resize(mask, height, width, Image.NEAREST)
  if normalize != 'unit':  # (over the whole image, before the patch is cut)
    if inside is not None:  # (as nnU-Net pads its normalised image)
      inside = resize(inside, height, width, Image.NEAREST).astype(bool)
    image = normalized(image.astype(np.float32) / peak, normalize, inside)
  if augment and aug.get('elastic_sigma', 0.0):
    # (at the training size, before the patch is cut: sigma is in those pixels; the image in
    # its own units still, float32 now)
    applied = applies(rng, aug.get('elastic_prob', 1.0))
    field = elastic.displacement_field(rng, height, width, aug.elastic_sigma,
                                       aug.get('elastic_grid', 3))
    if applied:
      image, mask = elastic.deform(image, mask, field)
  weight = None if border is None else border_weights.separation_term(mask, *border, ignore_id)
  if augment and crop:
    y0, x0 = rng.integers(0, height - crop + 1), rng.integers(0, width - crop + 1)
    if crop_foreground and rng.random() < crop_foreground:
      y0, x0 = _foreground_crop(mask, crop, rng, fill_label, (y0, x0))
    image, mask = image[y0:y0 + crop, x0:x0 + crop], mask[y0:y0 + crop, x0:x0 + crop]
    weight = None if weight is None else weight[y0:y0 + crop, x0:x0 + crop]
  extra = {} if weight is None else {'weight': weight}
  if normalize == 'unit':
    image = image.astype(np.float32) / peak
  if augment and aug.get('intensity_recipe', 'jitter') == 'nnunet':
    from unet_jax import nnunet_intensity
    return {'image': nnunet_intensity.augment(image, rng, aug), 'mask': mask.astype(np.int32),
            **extra}
  if augment and (aug.get('brightness', 0.0) or aug.get('contrast', 0.0)):
    image = _jitter(image, rng, aug.get('brightness', 0.0), aug.get('contrast', 0.0),
                    aug.get('brightness_prob', 1.0), aug.get('contrast_prob', 1.0))
  if augment and aug.get('gamma', ()):
    applied = applies(rng, aug.get('gamma_prob', 1.0))
    gamma = float(rng.uniform(*aug.gamma))
    image = adjust_gamma(image, gamma) if applied else image
  if augment and aug.get('noise', 0.0) and applies(rng, aug.get('noise_prob', 1.0)):
    # (the last draws: skipping them where the noise is not applied shifts no later one)
    std = np.float32(rng.uniform(0, aug.noise))
    image = image + std * rng.standard_normal(image.shape, np.float32)
  return {'image': image, 'mask': mask.astype(np.int32), **extra}


def applies(rng: np.random.Generator, prob: float) -> bool:
  """Whether an augmentation applies to this example: with probability `prob`, nnU-Net's
  p_per_sample (MONAI's `prob`). At 1, the default, nothing is drawn: streams stay as they were.
  (Here its own parameters are drawn either way, so the draws after it do not depend on it;
  nnunet_intensity draws them only where it applies, as nnU-Net does.)"""
  return prob >= 1.0 or bool(rng.random() < prob)


def _foreground_crop(mask: np.ndarray, crop: int, rng: np.random.Generator, fill_label: int,
                     fallback: tuple[int, int]) -> tuple[int, int]:
  """The corner of a crop x crop patch centred (as far as the edges allow) on a random pixel
  of a random class present but 0 and `fill_label` (nnU-Net's: a class first, so rare
  classes are found as often as common ones); `fallback` where there is none."""
  classes = [c for c in np.unique(mask) if c not in (0, fill_label)]
  if not classes:
    return fallback
  ys, xs = np.nonzero(mask == classes[int(rng.integers(0, len(classes)))])
  k = int(rng.integers(0, len(ys)))
  height, width = mask.shape
  return (min(max(int(ys[k]) - crop // 2, 0), height - crop),
          min(max(int(xs[k]) - crop // 2, 0), width - crop))


def rotate(image: np.ndarray, mask: np.ndarray, degrees: float, fill_label: int = 0,
           scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
  """Image (uint8 HxWxC, or uint16 of 16-bit gray) and mask turned `degrees` counter-clockwise about
  their centre, at their size (torchvision's `rotate(expand=False)`), and with `scale` enlarged (>
  1) or shrunk (< 1) about it in the same resampling (torchvision's `affine(angle, translate=(0, 0),
  scale, shear=0)`): the image bilinear, the mask nearest (no blended labels); what comes in from
  outside is black, with label `fill_label`. An image of other than 1 or 3 channels (one file per
  channel) is turned channel by channel (PIL's 2- and 4-channel modes would weigh the others by the
  last, as by alpha), as is a 16-bit one, as 32-bit float images (rounded back to uint16 as `resize`
  does)."""
  from PIL import Image
  deep = image.dtype == np.uint16
  rgb = image.shape[-1] == 3 and not deep
  planes = [image] if rgb else [image[..., c].astype(np.float32) if deep else image[..., c]
                                for c in range(image.shape[-1])]
  pictures = [Image.fromarray(p) for p in planes] + [Image.fromarray(mask)]
  fills = [(0, 0, 0) if rgb else 0] * len(planes) + [fill_label]
  resamples = [Image.BILINEAR] * len(planes) + [Image.NEAREST]
  if scale == 1.0:
    turned = [p.rotate(degrees, resample=r, fillcolor=f)
              for p, r, f in zip(pictures, resamples, fills, strict=True)]
  else:
    # PIL's rotate's matrix (output pixel -> source, about the centre), divided by the scale
    h, w = mask.shape
    cx, cy = w / 2, h / 2
    t = -math.radians(degrees)
    a, b = math.cos(t) / scale, math.sin(t) / scale
    matrix = (a, b, cx - a * cx - b * cy, -b, a, cy + b * cx - a * cy)
    turned = [p.transform((w, h), Image.AFFINE, matrix, resample=r, fillcolor=f)
              for p, r, f in zip(pictures, resamples, fills, strict=True)]
  out = [np.asarray(t) for t in turned]
  if deep:
    out = [sixteen_bit_plane(plane) for plane in out[:-1]] + out[-1:]
  return (out[0] if rgb else np.stack(out[:-1], axis=-1)), out[-1]


def adjust_gamma(image: np.ndarray, gamma: float) -> np.ndarray:
  """MONAI's `AdjustContrast(gamma)`: the image's range mapped to [0, 1], raised to `gamma`,
  mapped back (all channels together)."""
  low, span = image.min(), image.max() - image.min()
  scaled = (image - low) / (span + np.float32(1e-7))
  return (scaled ** np.float32(gamma) * span + low).astype(np.float32)


def _jitter(image: np.ndarray, rng: np.random.Generator, brightness: float, contrast: float,
            brightness_prob: float = 1.0, contrast_prob: float = 1.0) -> np.ndarray:
  """torchvision's ColorJitter brightness then contrast: factors drawn from [1 - b, 1 + b],
  `image * factor`, then the blend `factor * image + (1 - factor) * mean`, the mean of the
  image's grayscale (ITU-R 601 weights for RGB; other channel counts: of all channels); each
  clipped to [0, 1], each applied with its probability."""
  if brightness:
    applied = applies(rng, brightness_prob)
    factor = np.float32(rng.uniform(1 - brightness, 1 + brightness))
    if applied:
      image = np.clip(image * factor, 0, 1)
  if contrast:
    applied = applies(rng, contrast_prob)
    factor = np.float32(rng.uniform(1 - contrast, 1 + contrast))
    if applied:
      # (other than RGB: the mean of every channel, as of a gray image's one)
      gray = image @ np.float32([0.299, 0.587, 0.114]) if image.shape[-1] == 3 else image
      image = np.clip(factor * image + (1 - factor) * gray.mean(dtype=np.float32), 0, 1)
  return image.astype(np.float32)


def _global_position(j: int, local_batch: int, global_batch: int, process_index: int) -> int:
  """This process's j-th example -> its position in the global stream of batches."""
  return (j // local_batch) * global_batch + process_index * local_batch + j % local_batch


def microbatch_order(global_batch: int, microbatches: int, devices: int) -> np.ndarray:
  """The stream position (within its step) of each slot of a global batch split over
  `devices`, for a step that takes it in `microbatches` (grad_accum_steps): device d's slice
  holds its share of microbatch 0, then of microbatch 1, ..., so that microbatch m is the
  examples [m * M, (m + 1) * M) of the step (M = global_batch / microbatches) whatever the
  device count. One microbatch: the identity."""
  share = global_batch // microbatches // devices
  return np.arange(global_batch).reshape(microbatches, devices, share).transpose(1, 0, 2).ravel()


class _Permutations:
  """Per-epoch permutations of the training set, a pure function of (seed, epoch)."""

  def __init__(self, n: int, seed: int):
    self.n, self.seed = n, seed

  @functools.lru_cache(maxsize=4)  # noqa: B019 - a handful of epochs, freed with the pipeline
  def __call__(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self.seed, epoch]).permutation(self.n)


class _TrainExample(grain.transforms.Map):
  """This process's j-th example after the first `offset` of the global stream."""

  def __init__(self, source, config, process_index: int, process_count: int, offset: int = 0,
               devices: int = 1, ignore_id: int | None = None):
    self.source, self.config, self.offset = source, config, offset
    # Rotated-in corners are labelled ignored where the data has such a label, else class 0.
    self.fill_label = 0 if ignore_id is None else ignore_id
    self.ignore_id = ignore_id
    w0 = config.get('border_weight', 0.0)
    self.border = (w0, config.get('border_sigma', 5.0)) if w0 else None
    self.global_batch = config.batch_size
    self.local_batch = config.batch_size // process_count
    self.process_index = process_index
    self.permutations = _Permutations(len(source), config.seed)
    self.order = microbatch_order(config.batch_size, config.get('grad_accum_steps', 1), devices)

  def map(self, j: int) -> dict[str, np.ndarray]:
    slot = _global_position(j, self.local_batch, self.global_batch, self.process_index)
    g = self.offset + slot - slot % self.global_batch + int(self.order[slot % self.global_batch])
    record = _adapt(self.config, self.source[self.source_index(g)])
    rng = np.random.default_rng([self.config.seed, 1, g])
    return preprocess(record, image_hw(self.config), rng, self.config.augment,
                      image_resample(self.config), self.fill_label,
                      self.config.get('crop_size', 0),
                      self.foreground_share(int(self.order[slot % self.global_batch])),
                      image_normalization(self.config), self.border, self.ignore_id)

  def source_index(self, g: int) -> int:
    """The example at global stream position `g`: position g % n of pass g // n's permutation
    (data.sampling='epochs'), or one drawn uniformly for it alone ('replacement', as nnU-Net's
    DataLoader draws each batch with np.random.choice(replace=True)); a pure function of
    (seed, g) either way, so any process or device count reads the same stream."""
    if self.config.data.get('sampling', 'epochs') == 'replacement':
      return int(np.random.default_rng([self.config.seed, 2, g]).integers(len(self.source)))
    epoch, pos = divmod(g, len(self.source))
    return int(self.permutations(epoch)[pos])

  def foreground_share(self, in_batch: int) -> float:
    """The chance that the patch at stream position `in_batch` of its batch is centred on the
    foreground: nnU-Net's rule, 1 for the last round(batch * share) positions and 0 before
    (its DataLoader's get_do_oversample); each patch `share` with crop_foreground_random.
    Positions in the batch as the stream gives it: the same on any device or process count."""
    share = self.config.get('crop_foreground', 0.0)
    if not share or self.config.get('crop_foreground_random', False):
      return share
    return float(in_batch >= first_oversampled(self.global_batch, share))


def first_oversampled(batch_size: int, share: float) -> int:
  """nnU-Net's oversampling rule: the batch positions from this one on are centred on the
  foreground (its DataLoader's get_do_oversample); batch_size when none is."""
  return round(batch_size * (1 - share))


class _EvalExample(grain.transforms.Map):
  def __init__(self, source, config, global_batch: int, process_index: int, process_count: int):
    self.source, self.config = source, config
    self.global_batch, self.local_batch = global_batch, global_batch // process_count
    self.process_index = process_index

  def map(self, j: int) -> dict[str, np.ndarray]:
    g = _global_position(j, self.local_batch, self.global_batch, self.process_index)
    valid = g < len(self.source)  # the last global batch is padded with repeats, weighted 0
    record = _adapt(self.config, self.source[min(g, len(self.source) - 1)])
    out = preprocess(record, image_hw(self.config), None, None, image_resample(self.config),
                     normalize=image_normalization(self.config))
    out['valid'] = np.asarray(valid)
    return out


def train_dataset(source: Sequence[dict[str, Any]], config: ml_collections.ConfigDict,
                  start_step: int = 0, examples_seen: int | None = None,
                  devices: int | None = None, ignore_id: int | None = None,
                  ) -> grain.IterDataset:
  """This process's slices of the global training batches of steps start_step+1 to
  num_train_steps, which begin after the first `examples_seen` examples of the stream
  (default: start_step batches of this batch_size; a resumed run passes what its checkpoint
  consumed, so a changed batch_size continues the stream where it stopped). With
  grad_accum_steps > 1 each batch's examples are ordered for the step's `devices` (default:
  all) by microbatch_order. `ignore_id`: the dataset's ignored label (DataInfo.ignore_id), which
  the corners brought in by augment.rotate_degrees get."""
  pc, pi = jax.process_count(), jax.process_index()
  devices = devices or jax.device_count()
  local_batch = config.batch_size // pc
  if examples_seen is None:
    examples_seen = start_step * config.batch_size
  ds = grain.MapDataset.range(max(0, config.num_train_steps - start_step) * local_batch)
  ds = ds.map(_TrainExample(source, config, pi, pc, examples_seen, devices, ignore_id))
  ds = ds.batch(local_batch, drop_remainder=True)
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=config.data.num_threads,
                                            prefetch_buffer_size=2 * local_batch))
  if config.data.worker_count > 0:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.data.worker_count))
  return it


def close_train_iterator(it: Any) -> None:
  """Stops grain's worker processes and frees the shared memory their batches arrived in.

  Without this, Python's resource tracker warns at exit of "leaked shared_memory objects"
  (data.worker_count > 0; it frees them itself). Two things must finish first: the batches'
  arrays, some of them in reference cycles (hence a collection), and grain's unlinking of their
  memory, which it hands to a one-thread pool that the interpreter does not wait for."""
  if not hasattr(it, 'close'):
    return
  it.close()
  gc.collect()
  try:  # grain's own module; if a later grain moves it, only the warning can come back
    from grain._src.python.ipc.shared_memory_array import SharedMemoryArray
  except ImportError:
    return
  pool = getattr(SharedMemoryArray, '_del_thread_pool', None)
  if pool is not None:
    pool.apply(int)  # one thread, tasks in order: returns once every earlier unlink has run


def eval_dataset(source: Sequence[dict[str, Any]], config: ml_collections.ConfigDict,
                 ) -> grain.MapDataset:
  """This process's slices of the eval batches; the last one padded and marked by `valid`."""
  pc, pi = jax.process_count(), jax.process_index()
  global_batch = config.eval_batch_size or config.batch_size
  local_batch = global_batch // pc
  num_batches = -(-len(source) // global_batch)
  ds = grain.MapDataset.range(num_batches * local_batch)
  return ds.map(_EvalExample(source, config, global_batch, pi, pc)).batch(local_batch)
