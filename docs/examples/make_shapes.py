"""Writes an example folder of your own images: circles and squares, one class subfolder each.

    python docs/examples/make_shapes.py --out=/tmp/shapes_images [--num=1000 --size=16]

Each image is an RGB PNG of one filled shape of random colour, size and position on a
random dark background; `circle/` and `square/` are the two classes. Nothing is
downloaded: this is the example data of docs/own_images.md.
"""
import argparse
import os

import numpy as np
from PIL import Image
from PIL import ImageDraw


def draw(kind: str, size: int, rng: np.random.Generator) -> Image.Image:
  """One `size` x `size` picture of a `kind` ('circle' or 'square')."""
  background = tuple(int(v) for v in rng.integers(0, 80, 3))
  colour = tuple(int(v) for v in rng.integers(120, 256, 3))
  picture = Image.new("RGB", (size, size), background)
  extent = rng.uniform(0.35, 0.8) * size
  x0, y0 = rng.uniform(0, size - extent, 2)
  box = (x0, y0, x0 + extent, y0 + extent)
  pen = ImageDraw.Draw(picture)
  (pen.ellipse if kind == "circle" else pen.rectangle)(box, fill=colour)
  return picture


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--out", required=True, help="the folder to write (made if missing)")
  parser.add_argument("--num", type=int, default=1000, help="images in all, half per class")
  parser.add_argument("--size", type=int, default=16, help="image side in pixels")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  if args.num < 2 or args.size < 4:
    parser.error("--num must be at least 2 and --size at least 4")
  rng = np.random.default_rng(args.seed)
  for kind in ("circle", "square"):
    os.makedirs(os.path.join(args.out, kind), exist_ok=True)
  for i in range(args.num):
    kind = ("circle", "square")[i % 2]
    draw(kind, args.size, rng).save(os.path.join(args.out, kind, f"{i:05d}.png"))
  print(f"wrote {args.num} {args.size}x{args.size} images of circles and squares to {args.out}")


if __name__ == "__main__":
  main()
