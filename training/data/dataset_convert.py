"""Converting an image source into EDM's dataset format (docs/ECT.md §8): transforms, up-front checks and the
atomic writer. `convert_dataset` is what dataset_tool.py runs and what train.py uses to build a preset's data."""

import contextlib
import io
import json
import os
import re
import shutil
import tempfile
import zipfile

import numpy as np
import PIL.Image

import dnnlib
from torch_utils import progress
from training.data.dataset_sources import archive_name, check_output_shape, open_source

TRANSFORMS = ('center-crop', 'center-crop-wide', 'center-crop-dhariwal')


def parse_resolution(text):
    """'WxH' -> (W, H); None stays None."""
    if text is None:
        return None
    match = re.fullmatch(r'\s*(\d+)\s*[xX]\s*(\d+)\s*', text)
    if match is None or int(match.group(1)) < 1 or int(match.group(2)) < 1:
        raise dnnlib.UserError(f'--resolution: expected WxH with positive integers such as 64x64, got "{text}"')
    return int(match.group(1)), int(match.group(2))

#----------------------------------------------------------------------------
# Transforms (docs/ECT.md §8). Each maps uint8 HxW or HxWx3 to the output image, or None to skip it.


def resize(img, width, height, resample):
    return np.array(PIL.Image.fromarray(img).resize((width, height), resample))


def transform_scale(img, width, height):
    """EDM default: LANCZOS resize to the requested size, when one is given and differs."""
    if width is None or (img.shape[1], img.shape[0]) == (width, height):
        return img
    return resize(img, width, height, PIL.Image.Resampling.LANCZOS)


def as_rgb(img):
    return img if img.ndim == 3 else np.repeat(img[:, :, np.newaxis], 3, axis=2)


def transform_center_crop(img, width, height):
    """EDM center-crop (docs/ECT.md §8): centred min(H, W) square, grey replicated to RGB, LANCZOS resize."""
    s = min(img.shape[:2])
    top, left = (img.shape[0] - s) // 2, (img.shape[1] - s) // 2
    return resize(as_rgb(img[top:top + s, left:left + s]), width, height, PIL.Image.Resampling.LANCZOS)


def transform_center_crop_wide(img, width, height):
    """EDM center-crop-wide (docs/ECT.md §8): centred band of height round(W_out*H/W), LANCZOS, on a black square."""
    band = int(np.round(width * img.shape[0] / img.shape[1]))
    if img.shape[1] < width or band < height:
        return None
    top = (img.shape[0] - band) // 2
    canvas = np.zeros([width, width, 3], dtype=np.uint8)
    canvas[(width - height) // 2:(width + height) // 2] = resize(as_rgb(img[top:top + band]), width, height, PIL.Image.Resampling.LANCZOS)
    return canvas


def transform_center_crop_dhariwal(img, width, height):
    """ADM / EDM2 ImageNet preprocessing (docs/ECT.md §8): BOX halvings, BICUBIC to short side = res, centred crop."""
    res = width
    pil = PIL.Image.fromarray(as_rgb(img))
    while min(pil.size) >= 2 * res:
        pil = pil.resize(tuple(x // 2 for x in pil.size), resample=PIL.Image.Resampling.BOX)
    scale = res / min(pil.size)
    pil = pil.resize(tuple(round(x * scale) for x in pil.size), resample=PIL.Image.Resampling.BICUBIC)
    arr = np.array(pil)
    top, left = (arr.shape[0] - res) // 2, (arr.shape[1] - res) // 2
    return arr[top:top + res, left:left + res]


TRANSFORM_FNS = {
    None: transform_scale,
    'center-crop': transform_center_crop,
    'center-crop-wide': transform_center_crop_wide,
    'center-crop-dhariwal': transform_center_crop_dhariwal,
}

#----------------------------------------------------------------------------
# Up-front checks.


def check_transform_args(transform, resolution):
    if transform is None:
        if resolution is not None:
            check_output_shape(*resolution, 3, '--resolution')
        return
    if resolution is None:
        raise dnnlib.UserError(f'--resolution: must be given (WxH) with --transform={transform}')
    width, height = resolution
    if transform == 'center-crop-wide':
        check_output_shape(width, width, 3, '--resolution')
        if height > width:
            raise dnnlib.UserError(f'--resolution: height must not exceed width with --transform={transform}')
    else:
        check_output_shape(width, height, 3, '--resolution')


def check_headers(source, count, resolution):
    """Without a transform, every image must decode to the same channels (and size, without --resolution)."""
    first = None
    for i in range(count):
        width, height, channels = source.header(i)
        current = (channels,) if resolution is not None else (width, height, channels)
        hint = '' if resolution is not None else ' (give --resolution=WxH, and --transform to crop)'
        if first is None:
            first = current
            if resolution is None:
                check_output_shape(width, height, channels, source.names[i], hint)
        elif current != first:
            raise dnnlib.UserError(f'{source.names[i]}: {width}x{height} with {channels} channels differs from the first image{hint}')


def check_dest(dest):
    if not dest.strip():
        raise dnnlib.UserError('--dest: must not be empty')
    if os.path.isdir(dest) and not os.listdir(dest) and not dest.lower().endswith('.zip'):
        return
    if os.path.lexists(dest):
        raise dnnlib.UserError(f'--dest: {dest} already exists; choose a new name or remove it')
    dnnlib.util.check_output_dir(os.path.dirname(os.path.abspath(dest)), '--dest')

#----------------------------------------------------------------------------
# Output.


@contextlib.contextmanager
def open_dest(dest):
    """Yield write(name, bytes) into a temporary zip/folder next to `dest`; renamed to `dest` only on success."""
    if dest.lower().endswith('.zip'):
        with dnnlib.util.atomic_write(dest, 'wb') as f, zipfile.ZipFile(f, 'w', compression=zipfile.ZIP_STORED) as zf:
            yield zf.writestr
        os.chmod(dest, 0o666 & ~current_umask())
        return
    parent = os.path.dirname(os.path.abspath(dest))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=dnnlib.util.partial_prefix(dest), suffix='.tmp')
    try:
        yield lambda name, data: _write_member(tmp, name, data)
        os.chmod(tmp, 0o777 & ~current_umask())
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def current_umask():
    """The process umask (temporary files are created private; finished outputs get the usual permissions)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _write_member(root, name, data):
    path = os.path.join(root, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'wb') as f:
        f.write(data.encode('utf-8') if isinstance(data, str) else data)


def encode_png(img):
    """EDM's PNG: PIL, RGB or L, compress_level 0."""
    buf = io.BytesIO()
    PIL.Image.fromarray(img, 'L' if img.ndim == 2 else 'RGB').save(buf, format='png', compress_level=0, optimize=False)
    return buf.getvalue()


def convert(source, dest, count, transform, resolution):
    """Transform and write the first `count` images; returns (written, width, channels, num_classes)."""
    width, height = resolution if resolution is not None else (None, None)
    transform_fn = TRANSFORM_FNS[transform]
    labels, shape = [], None
    with progress.bar(total=count, desc='images', unit='img') as images_bar, open_dest(dest) as write:
        for idx in range(count):
            img = transform_fn(source.read(idx), width, height)
            images_bar.update(1)
            if img is None:
                continue
            if shape is None:
                shape = img.shape
                check_output_shape(img.shape[1], img.shape[0], 1 if img.ndim == 2 else img.shape[2], source.names[idx])
            elif img.shape != shape:
                raise dnnlib.UserError(f'{source.names[idx]}: gives a {img.shape} image, the first gave {shape}')
            write(archive_name(idx), encode_png(img))
            labels.append(None if source.labels[idx] is None else [archive_name(idx), source.labels[idx]])
        if shape is None:
            raise dnnlib.UserError(f'--source: no image is large enough for --transform={transform} at {width}x{height}')
        labelled = all(label is not None for label in labels)
        write('dataset.json', json.dumps({'labels': labels if labelled else None}))
    num_classes = max(label for _, label in labels) + 1 if labelled else 0
    return len(labels), shape[1], 1 if len(shape) == 2 else shape[2], num_classes


def convert_dataset(source_path, dest, max_images, resolution_text, transform):
    """Validate everything that can be checked up front, then convert; returns a one-line summary."""
    resolution = parse_resolution(resolution_text)
    check_transform_args(transform, resolution)
    check_dest(dest)
    with contextlib.ExitStack() as stack:
        source = open_source(source_path, stack, force_rgb=transform is not None, resolution=resolution)
        count = len(source.names) if max_images is None else min(max_images, len(source.names))
        if count == 0:
            raise dnnlib.UserError(f'--source: no images found in {source_path}')
        if transform is None:
            check_headers(source, count, resolution)
        written, res, channels, num_classes = convert(source, dest, count, transform, resolution)
    classes = f'{num_classes} classes' if num_classes else 'no labels'
    return f'{dest}: {written} images, {res}x{res}, {channels} channel{"s" * (channels > 1)}, {classes}'
