"""The input pipelines (--pipeline): images/s per loader worker (one CPU core) of each training transform we ship.

For each transform (the DeiT recipe of vitkd.py / ssta.py: RandAugment m9-mstd0.5, random erasing 0.25; sskd.py's
four views; sdssl.py's two BYOL views; attn_distill.py's one view) and each size (JPEGs the bench writes itself:
500 x 375 -> 224 px and 32 -> 32 px, quality 90), timed round-robin in one run, per image on one thread:
  pil     today's worker: PIL decode + the torchvision / timm transform + collate (the reference of the ratios)
  fast    the fast pipeline's worker: libjpeg-turbo decode + crop + flip on uint8 + collate   (target row)
  device  its device part on one batch (RandAugment / colour ops, normalisation, erasing): on this machine's device
  memory  (32 px) the memory pipeline: no worker at all; the device gathers, crops and augments the batch
  decode  JPEG decoding alone (torchvision.io), the floor under any worker that decodes on the CPU
Mixup / CutMix ran on the device before and still do: left out.

  python bench/bench_data.py          # CPU: 48 images of 500 x 375 and 512 of 32 px per timed call, 3 repeats
  python bench/bench_data.py --gpu    # + the device parts on the GPU (batches of 256 / 1024 images)
  python bench/bench_data.py --tiny   # a smoke run in seconds (120 x 90 -> 64 px, 4 and 8 images)

Targets (issue #21; the worker's time per image against today's): the DeiT transform x0.33 (3x the images/s per
core), the two-view SSL transform x0.25 (4x); ours: four views x0.33, one view x0.5 (its PIL path is light: the
decode alone is ~x0.4 of it at 500 x 375). The bound row says what is left to a worker that decodes on the CPU.
"""
import argparse
import io
import os
import tempfile

import torch
from torch.utils.data import default_collate
from torchvision import transforms

from harness import compare, parse_args, report
import common
import sdssl
import sskd

TINY = dict(big=[120, 90], big_size=64, images_big=4, images_small=8, device_batch_big=4, device_batch_small=8,
            repeats=1)
GPU = dict(device_batch_big=256, device_batch_small=1024)


def write_jpegs(root, n, w, h, seed=0, quality=90):
    """n JPEGs in root/train/c{0,1}/: smooth random colour fields with grain, ~0.5 byte / pixel at 500 x 375
    (ImageNet's average is ~0.8: its photographs decode somewhat slower per pixel)."""
    from PIL import Image
    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        field = torch.rand(3, h // 16 + 2, w // 16 + 2, generator=g)[None]
        img = torch.nn.functional.interpolate(field, size=(h, w), mode="bicubic", align_corners=False)[0] * 255
        img = (img + 12 * torch.randn(3, h, w, generator=g)).clamp(0, 255).byte().permute(1, 2, 0).numpy()
        os.makedirs(os.path.join(root, "train", f"c{i % 2}"), exist_ok=True)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "JPEG", quality=quality)
        with open(os.path.join(root, "train", f"c{i % 2}", f"{i:05d}.jpg"), "wb") as f:
            f.write(buf.getvalue())
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(root) for f in fs) / n


def recipes(size, stats):
    """name -> (reference transform, the fast worker's transform, the device steps)."""
    args = argparse.Namespace(input_size=size, mean=stats[0], std=stats[1], crop_pct=0.875)
    deit = common.build_transform(args, True)  # the DeiT recipe's defaults: rand-m9-mstd0.5-inc1, reprob 0.25
    crop, flip, *rest = deit.transforms
    four = sskd.FourViews(size, "rotation", stats)
    two = sdssl.TwoViews(size, (0.08, 1.0), (0.4, 0.4, 0.2, 0.1), stats)
    one_crop = transforms.RandomResizedCrop(size, scale=(0.2, 1.0), interpolation=transforms.InterpolationMode.BICUBIC)
    one = transforms.Compose([one_crop, transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                              transforms.Normalize(*stats)])
    return {"DeiT (vitkd / ssta)": (deit, common.CropFlip.like(crop, flip), common.device_steps(rest), 1 / 3),
            "SSKD four views": (four, sskd.FourCrops(four), [common.Normalise(*stats)], 1 / 3),
            "SSL two views (sdssl)": (two, two.crops, [two.on_device], 1 / 4),
            "one view (attn_distill)": (one, common.CropFlip.like(one_crop, one.transforms[1]),
                                        [common.Normalise(*stats)], 1 / 2)}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--big", default=[500, 375], type=int, nargs=2, metavar=("W", "H"), help="ImageNet-like JPEGs")
    p.add_argument("--big_size", default=224, type=int, help="training size of the big JPEGs")
    p.add_argument("--images_big", default=48, type=int, help="images per timed worker call, big JPEGs")
    p.add_argument("--images_small", default=512, type=int, help="images per timed worker call, 32 px JPEGs")
    p.add_argument("--device_batch_big", default=48, type=int, help="batch of the device part, big")
    p.add_argument("--device_batch_small", default=512, type=int, help="batch of the device part, 32 px")
    p.add_argument("--repeats", default=3, type=int)
    opts = parse_args(p, TINY, GPU)
    torch.set_num_threads(1)  # a loader worker's share: one core
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    stats = common.input_stats("")
    tmp = tempfile.TemporaryDirectory()
    for name, (w, h), size, n, batch in (("big", opts.big, opts.big_size, opts.images_big, opts.device_batch_big),
                                         ("small", (32, 32), 32, opts.images_small, opts.device_batch_small)):
        root = os.path.join(tmp.name, name)
        nbytes = write_jpegs(root, max(n, batch), w, h)
        data = argparse.Namespace(dataset="imagefolder", data_path=root, input_size=size, synthetic_size=0)
        paths = [s[0] for s in common.build_dataset(data, "train", None).samples[:n]]
        for title, (reference, worker, steps, target) in recipes(size, stats).items():
            old = common.build_dataset(data, "train", reference)
            new = common.build_dataset(data, "train", worker, uint8=True)
            on_device = common.OnDevice(steps)
            sample = default_collate([new[i] for i in range(batch)])
            sample = [v.to(device) for v in sample[0]] if isinstance(sample[0], list) else sample[0].to(device)
            fns = {"pil": lambda: default_collate([old[i] for i in range(n)]),
                   "fast": lambda: default_collate([new[i] for i in range(n)]),
                   "device": lambda: on_device(sample),
                   "decode": lambda: [common.load_uint8(q) for q in paths]}
            if name == "small":
                memory = common.MemoryImages(common.build_dataset(data, "train", common.to_uint8, uint8=True))
                on_memory, index = common.OnDevice(steps, worker, memory), torch.arange(batch, device=device)
                fns["memory"] = lambda: on_memory(index)
            t = compare(fns, device, repeats=opts.repeats)
            per_n = {k: v * n / batch if k in ("device", "memory") else v for k, v in t.items()}  # all per n images
            rows = [("pil: PIL decode + transform (today's worker)", per_n["pil"], n),
                    ("fast: decode + uint8 crop / flip (its worker)", per_n["fast"], n),
                    (f"fast: device part, batch {batch} on {device.type}", per_n["device"], n)]
            if device.type == "cpu":
                rows.append(("fast: worker + device part on one core", per_n["fast"] + per_n["device"], n))
            if "memory" in per_n:
                rows.append((f"memory: no worker; device part, batch {batch}", per_n["memory"], n))
            rows.append(("bound: JPEG decode alone (torchvision.io)", per_n["decode"], n))
            report(f"{title}: {w} x {h} JPEG ({nbytes / 1000:.1f} kB) -> {size} px, per worker core",
                   rows, device, target=(1, "<=", round(target, 3)))
    tmp.cleanup()


if __name__ == "__main__":
    main()
