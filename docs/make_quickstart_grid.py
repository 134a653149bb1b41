"""Compose docs/quickstart-grid.png from a quickstart run directory: the four sample grids side by side, labelled.

    python docs/make_quickstart_grid.py training-runs/00000-quickstart-shapes-16x16-uncond-ecm-gpus1-batch64-fp32
"""

import os
import re
import sys

import PIL.Image
import PIL.ImageDraw

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dnnlib  # noqa: E402 (after the path set-up)

SCALE = 4       # nearest-neighbour magnification of the 16x16 samples
LABEL_PX = 18   # height of the caption band


def final_grid(run_dir, tag):
    """The grid of the last snapshot with `tag` ('1step' / '2step')."""
    names = sorted(n for n in os.listdir(run_dir) if re.fullmatch(rf'grid-\d{{6}}-{tag}\.png', n))
    if not names:
        raise dnnlib.UserError(f'{run_dir}: no grid-*-{tag}.png (not a finished quickstart run?)')
    return os.path.join(run_dir, names[-1])


def compose(run_dir, out_path):
    panels = [('diffusion, Heun 35 NFE', os.path.join(run_dir, 'grid-initial-heun.png')),
              ('diffusion, 2 NFE', os.path.join(run_dir, 'grid-initial-2step.png')),
              ('ECM, 1 NFE', final_grid(run_dir, '1step')),
              ('ECM, 2 NFE', final_grid(run_dir, '2step'))]
    images = []
    for label, path in panels:
        if not os.path.isfile(path):
            raise dnnlib.UserError(f'{path}: missing (run the quickstart with --eval-init)')
        img = PIL.Image.open(path).convert('RGB')
        images.append((label, img.resize((img.width * SCALE, img.height * SCALE), PIL.Image.Resampling.NEAREST)))
    gap = 8
    width = sum(img.width for _, img in images) + gap * (len(images) - 1)
    canvas = PIL.Image.new('RGB', (width, images[0][1].height + LABEL_PX), 'white')
    draw = PIL.ImageDraw.Draw(canvas)
    x = 0
    for label, img in images:
        draw.text((x + 4, 3), label, fill='black')
        canvas.paste(img, (x, LABEL_PX))
        x += img.width + gap
    with dnnlib.util.atomic_write(out_path, 'wb') as f:
        canvas.save(f, format='png')


if __name__ == '__main__':
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    compose(sys.argv[1], os.path.join(os.path.dirname(os.path.abspath(__file__)), 'quickstart-grid.png'))
