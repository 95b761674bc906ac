"""What two or more scripts share: errors, distributed, models, ViT taps, data, training utilities, frozen features."""
import argparse
import collections.abc
import datetime
import functools
import json
import math
import os
import pickle
import random
import re
import subprocess
import sys
import time
import warnings
from contextlib import nullcontext, suppress

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import timm
import torchvision
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.distributed_sampler import RepeatAugSampler
from timm.utils import unwrap_model as unwrap  # the plain module inside DDP / torch.compile wrappers
from torchvision import datasets, transforms


# ---- 1. errors and printing -----------------------------------------------------------------
class UserError(Exception):
    """Bad input (flags, paths, checkpoints). Scripts turn it into a one-line error and exit 2."""


def fail(msg):
    raise UserError(msg)


def run_main(main, parser, argv=None):
    """A script's __main__: parse, run; a UserError (a worker's: its last line) -> one rank-0 stderr line, exit 2."""
    args = parser.parse_args(argv)
    try:
        main(args)
    except UserError as e:
        msg = str(e).strip().splitlines()[-1].split("UserError: ", 1)[-1]
        print0(f"error: {msg}", file=sys.stderr)
        if is_dist():
            dist.destroy_process_group()
        sys.exit(2)
    finally:  # the run is over: its output_dir is free (a process that goes on, e.g. a notebook, runs another)
        release_output_dir()


def print0(*args, **kwargs):
    """print on rank 0 only."""
    if get_rank() == 0:
        print(*args, **kwargs, flush=True)


def progress(iterable, desc="", total=None):
    """tqdm bar on rank 0 (for long loops: evaluation, feature extraction); plain iterable elsewhere."""
    if get_rank() != 0:
        return iterable
    from tqdm import tqdm
    return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True, mininterval=2.0)


# ---- 2. distributed -------------------------------------------------------------------------
def init_distributed():
    """Process group of torchrun's or srun's (SLURM_*) variables, else one process; nccl / gloo. Returns the device."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    elif "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        rank, world, local = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
        env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"] = str(rank), str(world), str(local)
        if "MASTER_ADDR" not in env:
            try:
                hosts = subprocess.check_output(["scontrol", "show", "hostnames", env["SLURM_JOB_NODELIST"]])
                env["MASTER_ADDR"] = hosts.decode().split()[0]
            except Exception:
                fail("SLURM launch without MASTER_ADDR, and `scontrol show hostnames` failed: export MASTER_ADDR")
        env.setdefault("MASTER_PORT", "29500")
    else:
        rank, world, local = 0, 1, 0
    device = torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", local % torch.cuda.device_count())
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
        dist.barrier()
    print0(f"| {world} process(es), device {device}")
    return device


def is_dist():
    return dist.is_available() and dist.is_initialized()


def get_rank():
    return dist.get_rank() if is_dist() else 0


def get_world_size():
    return dist.get_world_size() if is_dist() else 1


def is_main_process():
    return get_rank() == 0


@torch.no_grad()
def concat_all_gather(x):
    """Concatenate x over ranks along dim 0, without gradient (MoCo-style keys). Equal sizes."""
    if get_world_size() == 1:
        return x
    out = [torch.empty_like(x) for _ in range(get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, 0)


def _gather_parts(x, dst=None):
    """[rank 0's rows, rank 1's rows, ...] (ranks may hold different numbers) on rank dst, None on the others; dst
    None: on every rank."""
    sizes = concat_all_gather(torch.tensor([x.shape[0]], device=x.device)).tolist()
    x = torch.cat([x, x.new_zeros((max(sizes) - x.shape[0],) + x.shape[1:])], 0).contiguous()
    out = [torch.empty_like(x) for _ in sizes] if dst is None or get_rank() == dst else None
    dist.all_gather(out, x) if dst is None else dist.gather(x, out, dst=dst)
    return None if out is None else [o[:s] for o, s in zip(out, sizes)]


@torch.no_grad()
def gather_uneven(x, dst=None):
    """Like concat_all_gather, but ranks may hold different numbers of rows; dst: to that rank only (None elsewhere)."""
    if get_world_size() == 1:
        return x
    parts = _gather_parts(x, dst)
    return None if parts is None else torch.cat(parts, 0)


@torch.no_grad()
def gather_shards(x, dst=0):
    """build_loader's evaluation shards (rank r: rows r, r + W, ...) in dataset order, on rank dst only: one copy of a
    feature bank (DINO's k-NN), not one per rank; None on the others."""
    if get_world_size() == 1:
        return x
    parts = _gather_parts(x, dst)
    if parts is None:
        return None
    out = x.new_empty((sum(len(p) for p in parts),) + x.shape[1:])
    for r, p in enumerate(parts):
        out[r::len(parts)] = p
    return out


def all_reduce_sum(x):
    """Sum a tensor over ranks (in place, returned)."""
    if get_world_size() > 1:
        dist.all_reduce(x)
    return x


def reduce_metrics(metrics, device):
    """Average a dict of floats over ranks (for logging)."""
    if get_world_size() == 1 or not metrics:
        return dict(metrics)
    keys = sorted(metrics)
    t = all_reduce_sum(torch.tensor([float(metrics[k]) for k in keys], device=device, dtype=torch.float64))
    return {k: v / get_world_size() for k, v in zip(keys, t.tolist())}


# ---- 3. models ------------------------------------------------------------------------------
ALIASES = {f"{a}_{s}": f"{a}_{s}_patch16_224" for a in ("deit", "vit") for s in ("tiny", "small", "base")}
CHECKPOINT_KEYS = ("teacher", "student", "model", "state_dict", "state_dict_ema", "model_ema")
# MoCo v3's ViTs (its vits.py; a checkpoint's 'arch') as timm architectures: its ViT-S has 12 heads, timm's / DeiT's /
# DINO's 6, with tensors of the same shapes (a silent mix-up without this table)
MOCOV3_ARCHS = {"vit_small": dict(name="vit_small_patch16_224", num_heads=12),
                "vit_base": dict(name="vit_base_patch16_224", num_heads=12),
                "vit_large": dict(name="vit_large_patch16_224", num_heads=16),
                "vit_huge": dict(name="vit_huge_patch14_224", patch_size=16, num_heads=16)}
SHAPE_FLAGS = ("patch_size", "depth", "embed_dim", "num_heads")  # a pretrained network's shape overrides


def create_model(name, num_classes=None, mean=None, std=None, **overrides):
    """timm.create_model with aliases, tags, overrides (None: timm's); no download. model_config: arguments + stats."""
    full = ALIASES.get(name, name)
    check_timm_name(full, name)
    kwargs = {k: v for k, v in dict(overrides, num_classes=num_classes).items() if v is not None}
    for k in ("img_size", "patch_size", "depth", "embed_dim", "num_heads"):
        if not isinstance(kwargs.get(k, 1), int) or kwargs.get(k, 1) < 1:
            fail(f"{'--input_size' if k == 'img_size' else '--' + k} must be a positive integer, got {kwargs[k]}")
    try:
        model = timm.create_model(full, pretrained=False, **kwargs)
    except TypeError as e:
        sized, model = {k: kwargs.pop(k) for k in ("img_size", "dynamic_img_size") if k in kwargs}, None
        with suppress(TypeError):  # a model without a fixed input size (CNNs) takes any size: drop img_size for it
            model = timm.create_model(full, pretrained=False, **kwargs) if sized else None
        if model is None:
            fail(f"model '{name}' does not take these options {sorted({**kwargs, **sized})}: {e}")
    if getattr(getattr(model, "patch_embed", None), "img_size", None) is not None:
        (ih, iw), (ph, pw) = model.patch_embed.img_size, model.patch_embed.patch_size
        if ih % ph or iw % pw:
            fail(f"--input_size {ih} is not a multiple of the patch size {ph}: the image would be cropped to "
                 f"{ih // ph * ph} px (use a multiple of {ph})")
    if hasattr(model, "blocks") and len(model.blocks) < 1:
        fail(f"--depth must be at least 1 ('{name}')")
    mean, std = input_stats(full, mean=mean, std=std)
    model.model_config = dict(name=full, num_classes=model.num_classes, mean=mean, std=std,
                              **{k: v for k, v in kwargs.items() if k != "num_classes"})
    return model


def check_timm_name(full, given=None):
    """A clear error for an unknown architecture or an unknown pretrained tag (with the valid tags)."""
    arch, _, tag = full.partition(".")
    if not timm.is_model(arch):
        fail(f"unknown model '{given or full}': not a timm model name nor one of {sorted(ALIASES)}")
    if tag and full not in timm.list_pretrained(full):
        tags = [n.partition(".")[2] for n in timm.list_pretrained(arch + ".*")]
        fail(f"unknown tag '{tag}' for {arch}; its tags: {', '.join(tags) or 'none (no pretrained weights)'}")


def input_stats(name, weights=None, mean=None, std=None):
    """(mean, std) a network expects: the given ones, else timm's config of hub:NAME / tagged name, else ImageNet's."""
    if mean is not None and std is not None:
        return tuple(float(v) for v in mean), tuple(float(v) for v in std)
    tagged = weights[4:] if weights and weights.startswith("hub:") else (name if "." in name else None)
    cfg = None
    with suppress(RuntimeError):  # an unknown tag: create_model / load_weights say so
        cfg = timm.models.get_pretrained_cfg(tagged) if tagged else None
    own_mean, own_std = (cfg.mean, cfg.std) if cfg is not None else (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    return tuple(float(v) for v in (mean or own_mean)), tuple(float(v) for v in (std or own_std))


def renormalize_input(model, data_stats, label="teacher"):
    """Make `model` take inputs normalised with data_stats = (mean, std) if its model_config's differ: a pre-hook on the
    first 3-channel conv maps them on the device, so one decoded batch serves every network. Prints both."""
    own = (tuple(model.model_config["mean"]), tuple(model.model_config["std"]))
    data = (tuple(data_stats[0]), tuple(data_stats[1]))
    fmt = lambda st: f"mean {tuple(round(v, 4) for v in st[0])} std {tuple(round(v, 4) for v in st[1])}"  # noqa: E731
    if own == data:
        print0(f"| {label} input: {fmt(own)} (the data's)")
        return model
    stem = next((m for m in model.modules() if isinstance(m, nn.Conv2d) and m.in_channels == 3), None)
    if stem is None:
        fail(f"cannot re-normalise the {label}'s input: no 3-channel input convolution found")
    # x_own = x_data * scale + shift; the constants are made on the input's device and dtype once, not at every
    # forward (each .to() of a CPU tensor would be a blocking host-to-device copy)
    scale = torch.tensor([s / d for s, d in zip(data[1], own[1])]).view(1, 3, 1, 1)
    shift = torch.tensor([(m - o) / d for m, o, d in zip(data[0], own[0], own[1])]).view(1, 3, 1, 1)
    made = {}

    def hook(module, inputs):
        x = inputs[0]
        key = (x.device, x.dtype)
        if key not in made:
            made[key] = scale.to(x), shift.to(x)
        return (x * made[key][0] + made[key][1],) + tuple(inputs[1:])
    stem.register_forward_pre_hook(hook)
    print0(f"| {label} input: {fmt(own)}; re-normalised on the device from the data's {fmt(data)}")
    return model


def sincos_2d(grid_h, grid_w, dim, layout="mae", temperature=10000.0):
    """Fixed 2-D sin-cos position embedding, (grid_h * grid_w, dim), row-major; x the column, y the row. layout 'mae'
    (MAE, ViTKD's generator): [sin x, cos x, sin y, cos y]; 'moco' (MoCo v3): [sin y, cos y, sin x, cos x]."""
    if dim % 4:
        fail(f"sin-cos position embedding needs a width divisible by 4, got {dim}")
    y, x = torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in (grid_h, grid_w)), indexing="ij")
    omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    a, b = (t.reshape(-1, 1) * omega for t in ((x, y) if layout == "mae" else (y, x)))
    return torch.cat([a.sin(), a.cos(), b.sin(), b.cos()], 1)


def read_checkpoint(path, trust=False):
    """torch.load on CPU, weights_only (and argparse.Namespace: DINO, DeiT, MAE); more only with `trust`
    (--trust_checkpoint)."""
    if not os.path.isfile(path):
        fail(f"checkpoint not found: {path} (local paths are never downloaded; use hub:NAME for timm weights)")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            return load_file(path)
        try:
            with torch.serialization.safe_globals([argparse.Namespace]):
                return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            if "This file can still be loaded" not in str(e):  # torch's words for "a global outside the allow-list"
                raise
            if not trust:  # full unpickling runs whatever code the file names
                what = next(iter(re.findall(r"GLOBAL ([\w.]+)", str(e))), "a global outside the allow-list")
                fail(f"{path} holds Python objects beyond tensors ({what}); loading it would run code from the file: "
                     "pass --trust_checkpoint if you trust it")
            print0(f"warning: {path}: full unpickling (--trust_checkpoint)")
            return torch.load(path, map_location="cpu", weights_only=False)
    except UserError:
        raise
    except (pickle.UnpicklingError, EOFError, UnicodeDecodeError, ValueError, KeyError) as e:
        fail(f"{path} is not a PyTorch checkpoint ({type(e).__name__})")
    except Exception as e:
        fail(f"cannot read checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")


def pick_state_dict(ckpt, key, source):
    if key is not None:
        if not isinstance(ckpt, dict) or key not in ckpt:
            top = sorted(ckpt)[:12] if isinstance(ckpt, dict) else type(ckpt).__name__
            fail(f"{source} has no key '{key}' (top-level keys: {top})")
        return ckpt[key], key
    if isinstance(ckpt, dict) and ckpt and all(torch.is_tensor(v) for v in ckpt.values()):
        return ckpt, None
    for k in CHECKPOINT_KEYS:
        if isinstance(ckpt, dict) and isinstance(ckpt.get(k), dict) and ckpt[k]:
            return ckpt[k], k
    fail(f"{source}: no state dict found (looked for a plain state dict and the keys {list(CHECKPOINT_KEYS)})")


def load_weights(model, source, key=None, ckpt=None, require_head=False, trust=False):
    """Load `model` from a file (timm, DeiT, MAE, DINO, MoCo v3, ours; `key`: top-level key; `ckpt`: content if read),
    hub:<timm name> or 'random'. The file's state dict is mapped onto the model (prefixes, the DINO / MoCo v3 backbone
    part, MAE's decoder, a classifier of other classes, pos_embed resampled); then missing / unexpected keys beyond the
    classifier, which require_head needs, are an error."""
    if source == "random":
        print0(f"warning: {getattr(model, 'model_config', {}).get('name', 'model')} keeps RANDOM weights (asked for)")
        return
    used_key = None
    if source.startswith("hub:"):
        if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
            with suppress(Exception):  # honour an HF_HUB_OFFLINE set after huggingface_hub was imported
                import huggingface_hub.constants as hfc
                hfc.HF_HUB_OFFLINE = True
        check_timm_name(source[4:], source)
        try:
            sd = timm.create_model(source[4:], pretrained=True).state_dict()
        except Exception as e:
            fail(f"could not fetch {source} ({type(e).__name__}); this needs the network or a filled Hugging Face "
                 f"cache (HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', 'unset')}); otherwise pass a local file")
    else:
        ckpt = read_checkpoint(os.path.expanduser(source), trust) if ckpt is None else ckpt
        sd, used_key = pick_state_dict(ckpt, key, source)
    model_sd, notes = model.state_dict(), []
    sd = timm.models.clean_state_dict({k: v for k, v in sd.items() if torch.is_tensor(v)})  # DDP / compile prefixes
    for p in ("backbone.", "base_encoder.", "encoder."):
        if any(k.startswith(p) for k in sd) and not any(k.startswith(p) for k in model_sd):
            kept = {k[len(p):]: v for k, v in sd.items() if k.startswith(p)}
            if len(kept) < len(sd):
                notes.append(f"kept the '{p}' part ({len(kept)} of {len(sd)} tensors)")
            sd = kept
            break
    foreign = [k for k in sd if k not in model_sd and (k.startswith("decoder") or k == "mask_token")]
    if foreign:
        notes.append(f"dropped {len(foreign)} MAE decoder tensors")
        sd = {k: v for k, v in sd.items() if k not in foreign}
    if ("dist_token" in sd) != ("dist_token" in model_sd):  # DeiT's distillation token: one more prefix token
        has = lambda sd_: "a distillation token (DeiT distilled)" if "dist_token" in sd_ else "none"  # noqa: E731
        fail(f"{source} holds {has(sd)} and the model {has(model_sd)}: pick the matching architecture "
             f"({'deit_*_distilled_patch16_224' if 'dist_token' in sd else 'deit_* / vit_* without _distilled'})")
    heads = model.pretrained_cfg.get("classifier", "head") if hasattr(model, "pretrained_cfg") else "head"
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    is_head = lambda k: any(k == h or k.startswith(h + ".") for h in heads)  # noqa: E731
    dropped = [k for k in sd if is_head(k) and (k not in model_sd or model_sd[k].shape != sd[k].shape)]
    if dropped:
        classes = sorted({sd[k].shape[0] for k in dropped if k.endswith(".weight") and sd[k].dim() == 2})
        notes.append(f"dropped classifier {dropped} (shape or presence differs"
                     + (f": {'/'.join(map(str, classes))} classes in the file)" if classes else ")"))
        sd = {k: v for k, v in sd.items() if k not in dropped}
    if ("pos_embed" in sd and "pos_embed" in model_sd and sd["pos_embed"].shape != model_sd["pos_embed"].shape
            and sd["pos_embed"].shape[-1] == model_sd["pos_embed"].shape[-1]):  # other widths: a plain mismatch
        npt = 0 if getattr(model, "no_embed_class", False) else getattr(model, "num_prefix_tokens", 1)
        src, n = sd["pos_embed"], sd["pos_embed"].shape[1] - npt
        side = int(round(math.sqrt(n)))
        if side * side != n:
            fail(f"{source}: cannot resample pos_embed {tuple(src.shape)} to {tuple(model_sd['pos_embed'].shape)} (the "
                 f"model has {npt} prefix token(s) and a {'x'.join(map(str, model.patch_embed.grid_size))} patch grid)")
        from timm.layers import resample_abs_pos_embed  # plain bicubic, as MAE's interpolate_pos_embed and DeiT's main.py
        sd["pos_embed"] = resample_abs_pos_embed(src, list(model.patch_embed.grid_size), old_size=[side, side],
                                                 num_prefix_tokens=npt, antialias=False)
        notes.append(f"resampled pos_embed {side}x{side} -> {'x'.join(map(str, model.patch_embed.grid_size))}")
    check_state_dict(sd, model, source, optional=is_head)
    model.load_state_dict(sd, strict=False)
    head_missing = [k for k in model_sd if k not in sd]
    if head_missing and require_head:
        other = any(n.startswith("dropped classifier") for n in notes)
        fail(f"{source} holds no classifier for this model ({', '.join(notes) or 'none in the file'}); "
             + (f"the data has {model.num_classes} classes: a teacher's classifier must be trained on the data's classes"
                if other else "a teacher needs its own: give it the file's number of classes"))
    if head_missing:
        notes.append(f"classifier left at init: {head_missing}")
    print0(f"| loaded {len(sd)} tensors from {source}" + (f" [{used_key}]" if used_key else "")
           + ("; " + "; ".join(notes) if notes else ""))


def check_state_dict(sd, model, source, optional=lambda key: False):
    """A clear error listing the missing (beyond `optional`), unexpected and mis-shaped keys of sd against model;
    a tensor with NaN or inf is refused by name (else a teacher's NaN shows only as the first step's loss)."""
    bad = [k for k, v in sd.items() if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        fail(f"{source}: non-finite values (NaN or inf) in {bad[0]}" + (f" and {len(bad) - 1} more tensors" if
                                                                       len(bad) > 1 else "") + "; refusing to load it")
    model_sd = model.state_dict()
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(model_sd[k].shape)}" for k, v in sd.items()
             if k in model_sd and v.shape != model_sd[k].shape]
    missing = [k for k in model_sd if k not in sd and not optional(k)]
    unexpected = [k for k in sd if k not in model_sd]
    if wrong or missing or unexpected:
        short = lambda keys: f"{keys[:6]}{' ... (%d in all)' % len(keys) if len(keys) > 6 else ''}"  # noqa: E731
        parts = [f"{n}: {short(v)}" for n, v in (("missing", missing), ("unexpected", unexpected),
                                                 ("shape mismatch", wrong)) if v]
        fail(f"{source} does not match the model: " + "; ".join(parts))


def saved_model_config(source, key=None, trust=False):
    """(what a file says about its network, its content): this repository's 'model_config' (or the .json beside an
    export); else MoCo v3's 'arch' (MOCOV3_ARCHS) or timm train.py's; and global_pool 'avg' for a state dict with
    fc_norm and no final norm (MAE's finetunes). A dict without 'name' when only that is known; None when nothing is
    said (the content stays None for hub: / random)."""
    if not source or source == "random" or source.startswith("hub:"):
        return None, None
    ckpt, config = read_checkpoint(os.path.expanduser(source), trust), {}
    sidecar = os.path.splitext(os.path.expanduser(source))[0] + ".json"
    if isinstance(ckpt, dict) and isinstance(ckpt.get("model_config"), dict):
        config = dict(ckpt["model_config"])
    elif os.path.isfile(sidecar):
        with open(sidecar) as f:
            config = json.load(f)
    elif isinstance(ckpt, dict):
        arch = ckpt.get("arch")
        if isinstance(arch, str) and arch.startswith("vit_conv_"):
            fail(f"{source} is MoCo v3's {arch} (a convolutional stem): no timm architecture holds it")
        if isinstance(arch, str) and arch in MOCOV3_ARCHS:
            config = dict(MOCOV3_ARCHS[arch])
            print0(f"| {source}: MoCo v3's {arch} = {config}")
        elif isinstance(arch, str) and timm.is_model(arch.partition(".")[0]):  # timm train.py's 'arch'
            config = {"name": arch}
        keys = set(timm.models.clean_state_dict(pick_state_dict(ckpt, key, source)[0]))
        if "fc_norm.weight" in keys and "norm.weight" not in keys:  # MAE finetune's global pool (main_finetune.py)
            config["global_pool"] = "avg"
    return config or None, ckpt


def pretrained_config(name, weights, key=None, flag="--arch", prefix="", trust=False, **overrides):
    """(create_model kwargs, file content) of a network loaded from `weights`: what the file says (saved_model_config),
    `name` (the flag `flag`) in place of its name, then the overrides (None: ignored). A ViT-S name that the file does
    not settle gets a note: 6 heads are assumed (timm, DeiT, DINO) where MoCo v3's and SDSSL's have 12."""
    said, ckpt = saved_model_config(weights, key, trust)
    name = name or (weights[4:] if weights and weights.startswith("hub:") else None)
    config = dict(said or {}, **({"name": name} if name else {}))
    if "name" not in config:
        fail(f"cannot tell the architecture of {weights or 'the model'}: pass {flag}")
    config.update({k: v for k, v in overrides.items() if v is not None})
    arch, _, tag = ALIASES.get(config["name"], config["name"]).partition(".")  # a tag (.dino, .augreg...): timm's 6
    if (arch.startswith("vit_small_") and not tag and "num_heads" not in config and "name" not in (said or {})
            and weights and weights != "random" and not weights.startswith("hub:")):
        print0(f"| {name}: {weights} does not say its head count; 6 heads assumed (timm's, DeiT's and DINO's ViT-S). "
               f"MoCo v3's and SDSSL's ViT-S have 12 (same tensor shapes): pass --{prefix}num_heads 12 for theirs")
    return config, ckpt


def add_shape_args(group, prefix, who):
    """--{prefix}patch_size / depth / embed_dim / num_heads: shape overrides of a pretrained network `who`."""
    for k in SHAPE_FLAGS:
        group.add_argument(f"--{prefix}{k}", default=None, type=int, help=f"{who}: {k.replace('_', ' ')} (default: its "
                           "file's, else its name's)" + ("; MoCo v3 / SDSSL ViT-S: 12" if k == "num_heads" else ""))


def shape_args(args, prefix=""):
    """{patch_size, depth, embed_dim, num_heads} of add_shape_args' flags (None: not given)."""
    return {k: getattr(args, prefix + k) for k in SHAPE_FLAGS}


def build_teacher(name, weights, key=None, data_stats=None, mean=None, std=None, label="teacher", trust=False,
                  **overrides):
    """Frozen teacher; `weights` (file, hub:NAME, 'random') and its classifier required; data_stats: renormalize_input.
    Its config: pretrained_config (the file's, `name` on top, then overrides: None ignored); stats: mean / std, else
    the file's, else input_stats."""
    if not weights:
        fail(f"{label} '{name}' needs weights: a local file, hub:<timm name>, or 'random' (smoke tests only)")
    config, ckpt = pretrained_config(name, weights, key, f"--{label}", f"{label}_", trust, **overrides)
    config["mean"], config["std"] = input_stats(config["name"], weights, mean or config.get("mean"),
                                                std or config.get("std"))
    model = create_model(**config)
    load_weights(model, weights, key, ckpt=ckpt, require_head=model.num_classes > 0, trust=trust)
    if data_stats is not None:
        renormalize_input(model, data_stats, label)
    return freeze(model)


def freeze(model):
    """No gradients, eval mode, and train() can no longer switch it back (mdistiller's trick)."""
    model.requires_grad_(False).eval()
    model.train = lambda mode=True: model
    return model


def export_backbone(model, path):
    """Write model's plain timm state dict (timm's checkpoint_path= loads it) and <path>.json of its model_config."""
    model = unwrap(model)
    atomic_save({k: v.detach().cpu() for k, v in model.state_dict().items()}, path)
    if is_main_process() and hasattr(model, "model_config"):
        with open(os.path.splitext(path)[0] + ".json", "w") as f:
            json.dump(model.model_config, f, indent=1)


# ---- 4. ViT taps ----------------------------------------------------------------------------
class ViTTaps:
    """Hooks on a timm ViT that leave its forward as it is (fused attention everywhere). `with ViTTaps(vit,
    token_blocks=[0, -1], attn_blocks=[-1]) as taps: vit(x)` fills taps.tokens[i] (B x N x D with prefix tokens;
    where 'ffn': block output, 'mha': input + attention branch; `norm`: True / False / blocks through the final norm)
    and keeps the queries and keys of the `attn_blocks` (their q_norm / k_norm outputs, which the fused attention
    reads anyway). The attention a method reads is computed from them, only that: taps.maps(blocks, heads, rows) (one
    batched matmul and softmax for several blocks), or taps.attn[i] (B x H x N x N, or B x H x r x N with attn_rows=r,
    computed when read). Both keep the graph to q and k under grad. head_masks {block: (H,) or (B, H)} scale heads
    before the projection. close() removes the hooks; what the last forward left stays readable."""

    def __init__(self, model, token_blocks=(), attn_blocks=(), where="ffn", norm=False, head_masks=None, attn_rows=None):
        if not hasattr(model, "blocks") or not all(hasattr(b, "attn") and hasattr(b.attn, "q_norm")
                                                   for b in model.blocks):
            fail(f"ViT taps need a timm VisionTransformer (blocks with attn.q_norm / k_norm), got {type(model).__name__}")
        if where not in ("ffn", "mha"):
            fail(f"where must be 'ffn' or 'mha', got {where!r}")
        self.model, depth, self.attn_rows = model, len(model.blocks), attn_rows
        idx = lambda i: i % depth if -depth <= i < depth else fail(f"block {i} out of range for depth {depth}")  # noqa
        self.token_blocks = sorted({idx(i) for i in token_blocks})
        self.attn_blocks = sorted({idx(i) for i in attn_blocks})
        norm_set = set(self.token_blocks) if norm is True else {idx(i) for i in (norm or ())}
        self.tokens, self.qk, self.head_masks, self.num_prefix_tokens = {}, {}, {}, model.num_prefix_tokens
        self.attn = _AttentionMaps(self)
        self._handles, self._inputs, self._mask_hooks = [], None, {}
        for i in self.token_blocks:
            blk, post = model.blocks[i], (model.norm if i in norm_set else None)
            if where == "ffn":
                self._handles.append(blk.register_forward_hook(self._save_block(i, post)))
            else:
                self._handles.append(blk.register_forward_pre_hook(self._save_input))
                self._handles.append(blk.drop_path1.register_forward_hook(self._save_block(i, post, add_input=True)))
        for i in self.attn_blocks:
            a = model.blocks[i].attn
            self._handles += [a.q_norm.register_forward_hook(self._save_qk(i, 0)),
                              a.k_norm.register_forward_hook(self._save_qk(i, 1))]
        self.set_head_masks({idx(k): v for k, v in (head_masks or {}).items()})

    def _save_block(self, i, post, add_input=False):  # add_input: 'mha', block input + attention branch
        def hook(module, inputs, output):
            out = self._inputs + output if add_input else output
            self.tokens[i] = post(out) if post is not None else out
        return hook

    def _save_input(self, module, inputs):
        self._inputs = inputs[0]

    def _save_qk(self, i, which):  # B x H x N x d: a view of the block's qkv output, which its attention keeps anyway
        def hook(module, inputs, output):
            self.qk.setdefault(i, [None, None])[which] = output
        return hook

    def maps(self, blocks, heads=None, rows=None, cls_patches=False, logits=False):
        """Softmax attention of `blocks`, stacked: L x B x H x r x N' (heads None: all), or L x B x r x N' with one
        head per block (heads: a list of ints); `blocks` an int: that block's map, B x H x r x N' (nothing stacked).
        rows: the first r query rows only; "cls": the CLS query's row alone, without the query dimension (L x B x H x
        N'), as a product with the keys summed over the channels: 4 ops where the batched matmul of 4-D tensors
        dispatches 8, and fewer in the backward. cls_patches: the queries and keys CLS and patches only (other prefix
        tokens dropped: the map a network without them would have, i.e. the rows of the full map renormalised over
        those keys). As timm's unfused path computes it: q x scale, q k^T, softmax, in the dtype autocast gives.
        logits: the scores q x scale k^T, before the softmax."""
        if isinstance(blocks, int):
            q, k = self.qk[blocks]
            blocks = [blocks]
        else:
            q, k = ([self.qk[b][j] if heads is None else self.qk[b][j][:, h] for b, h in zip(blocks, heads or blocks)]
                    for j in (0, 1))
            q, k = torch.stack(q), torch.stack(k)
        npt = self.num_prefix_tokens
        if cls_patches and npt > 1:
            q, k = (torch.cat([t[..., :1, :], t[..., npt:, :]], -2) for t in (q, k))
        scale = self.model.blocks[blocks[0]].attn.scale  # the same in every block of a ViT
        if rows == "cls":
            scores = (k * (q[..., :1, :] * scale)).sum(-1)
        else:
            scores = ((q if rows is None else q[..., :rows, :]) * scale) @ k.transpose(-2, -1)  # a full slice dispatches
        return scores if logits else scores.softmax(-1)

    def set_head_masks(self, masks):
        """Replace the head masks: {block: (H,) or (B, H) tensor}; blocks left out are unmasked."""
        masks = {i % len(self.model.blocks): m for i, m in masks.items()}
        for i in list(self._mask_hooks):
            if i not in masks:
                self._mask_hooks.pop(i).remove()
        self.head_masks = masks
        for i in masks:
            if i not in self._mask_hooks:
                self._mask_hooks[i] = self.model.blocks[i].attn.proj.register_forward_pre_hook(self._mask(i))

    def _mask(self, i):
        heads = self.model.blocks[i].attn.num_heads

        def hook(module, inputs):
            x, m = inputs[0], self.head_masks[i]
            m = m.to(x.dtype).view(1 if m.dim() == 1 else m.shape[0], 1, heads, 1)
            return (x.unflatten(-1, (heads, -1)) * m).flatten(-2),
        return hook

    def close(self):
        for h in self._handles + list(self._mask_hooks.values()):
            h.remove()
        self._handles, self._mask_hooks, self._inputs = [], {}, None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _AttentionMaps(collections.abc.Mapping):
    """ViTTaps.attn: block -> its B x H x N x N softmax map (B x H x r x N with attn_rows), computed from the kept q and
    k when read."""

    def __init__(self, taps):
        self.taps = taps

    def __getitem__(self, i):
        if i not in self.taps.qk:
            raise KeyError(i)
        return self.taps.maps(i, rows=self.taps.attn_rows)

    def __iter__(self):
        return iter(sorted(self.taps.qk))

    def __len__(self):
        return len(self.taps.qk)


def vit_embed(model, x):
    """The start of timm's VisionTransformer.forward_features: patch embedding, position embedding with the prefix
    tokens, patch dropout, pre-norm (then come the blocks and the final norm)."""
    return model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))


# ---- 5. data --------------------------------------------------------------------------------
def add_data_args(parser, input_size=224):
    """Data flags shared by every script."""
    g = parser.add_argument_group("data")
    g.add_argument("--data_path", default="", type=str, help="ImageFolder root with train/ and val/ (or test/), or "
                   "the CIFAR root; unused for synthetic/fake")
    g.add_argument("--dataset", default="imagefolder",
                   choices=["imagefolder", "cifar10", "cifar100", "fake", "synthetic"],
                   help="synthetic: built-in learnable shapes (offline smoke runs); fake: torchvision FakeData (noise)")
    g.add_argument("--download", action="store_true", help="allow torchvision to download CIFAR into --data_path")
    g.add_argument("--input_size", default=input_size, type=int, help="image side in pixels")
    g.add_argument("--crop_pct", default=0.875, type=float,
                   help="evaluation: resize to input_size / crop_pct, then centre crop")
    g.add_argument("--synthetic_size", default=2000, type=int, help="training images of the synthetic/fake dataset")
    g.add_argument("--num_workers", default=8, type=int, help="data loader workers per process")
    g.add_argument("--mean", default=None, type=float, nargs=3, help="input normalisation (training: of the data and "
                   "the student, default ImageNet's; eval_knn_linear.py: overrides the backbone's own)")
    g.add_argument("--std", default=None, type=float, nargs=3, help="as --mean")
    return g


def data_stats(args):
    """(mean, std) of the data pipeline: --mean / --std, else ImageNet's. Teachers expecting others re-normalise."""
    return input_stats("", mean=args.mean, std=args.std)


class SyntheticShapes(torch.utils.data.Dataset):
    """Learnable shapes (10 classes, random colours, sizes, positions, noise) for offline runs; image i = f(seed, i)."""
    classes = ["disc", "square", "triangle", "cross", "ring", "diamond", "hgrating", "vgrating", "dgrating", "checker"]

    _rendered = {}  # (seed, img_size, i) -> image (3 KB), shared by this process's datasets (and each worker's copy)

    def __init__(self, size, img_size=32, seed=0, transform=None):
        self.size, self.img_size, self.seed, self.transform = size, img_size, seed, transform
        self.targets = [i % 10 for i in range(size)]

    def __len__(self):
        return self.size

    def render(self, i):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        u = lambda lo, hi: lo + (hi - lo) * torch.rand((), generator=g).item()  # noqa: E731
        y, x = torch.meshgrid(*[torch.arange(self.img_size) / self.img_size] * 2, indexing="ij")
        cx, cy, r = u(0.3, 0.7), u(0.3, 0.7), u(0.15, 0.3)
        f, ph, dx, dy = u(2.5, 6.0), u(0, 2 * math.pi), x - cx, y - cy
        wave = lambda t: torch.sin(2 * math.pi * f * t + ph) > 0  # noqa: E731
        shape = (  # self.classes, in order
            lambda: dx ** 2 + dy ** 2 < r ** 2, lambda: torch.maximum(dx.abs(), dy.abs()) < 0.8 * r,
            lambda: (dy.abs() < r) & (dx.abs() < (dy + r) / 2),
            lambda: ((dx.abs() < r / 4) & (dy.abs() < r)) | ((dy.abs() < r / 4) & (dx.abs() < r)),
            lambda: ((dx ** 2 + dy ** 2).sqrt() - 0.7 * r).abs() < 0.3 * r, lambda: dx.abs() + dy.abs() < r,
            lambda: wave(y), lambda: wave(x), lambda: wave((x + y) / math.sqrt(2)), lambda: wave(x) ^ wave(y),
        )[self.targets[i]]()
        fg = torch.rand(3, generator=g)
        bg = (fg + 0.35 + 0.3 * torch.rand(3, generator=g)) % 1.0
        img = torch.where(shape[None], fg[:, None, None], bg[:, None, None])
        img = (img + 0.05 * torch.randn(img.shape, generator=g)).clamp(0, 1)
        return transforms.functional.to_pil_image(img)

    def __getitem__(self, i):
        key = (self.seed, self.img_size, i)
        img = self._rendered[key] if key in self._rendered else self._rendered.setdefault(key, self.render(i))
        return (self.transform(img) if self.transform else img), self.targets[i]


def build_dataset(args, split, transform, uint8=False):
    """split: 'train' or 'val'. Fails with one line on a missing or empty path before any work. uint8: image folders
    decode to uint8 tensors (load_uint8: the fast pipelines), not PIL images."""
    name, root, is_train = args.dataset, os.path.expanduser(args.data_path or ""), split == "train"
    if name in ("synthetic", "fake"):
        n = args.synthetic_size if is_train else max(args.synthetic_size // 4, 10)
        if name == "synthetic":
            return SyntheticShapes(n, seed=0 if is_train else 1, transform=transform)
        ds = datasets.FakeData(n, (3, args.input_size, args.input_size), 10, transform,
                               random_offset=0 if is_train else 10 ** 6)
        ds.classes = [str(c) for c in range(10)]  # FakeData has none; the scripts size their classifiers by it
        return ds
    if not root:
        fail(f"--data_path is required for --dataset {name}")
    if name in ("cifar10", "cifar100"):
        cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
        if not os.path.isdir(root) and not args.download:
            fail(f"data path not found: {root} (pass --download to fetch {name} there)")
        try:
            return cls(root, train=is_train, transform=transform, download=args.download)
        except RuntimeError as e:
            fail(f"{name} not found under {root} ({e}); pass --download to fetch it")
    if not os.path.isdir(root):
        fail(f"data path not found: {root}")
    sub = ["train"] if is_train else ["val", "test"]
    folder = next((os.path.join(root, s) for s in sub if os.path.isdir(os.path.join(root, s))), None)
    if folder is None:
        fail(f"{root} has no {' or '.join(s + '/' for s in sub)} folder (ImageNet layout: train/ and val/)")
    try:
        ds = datasets.ImageFolder(folder, transform=transform, loader=load_uint8 if uint8 else load_rgb)
    except (FileNotFoundError, RuntimeError) as e:
        fail(f"no images in {folder}: {e}")
    train = os.path.join(root, "train")
    return ds if is_train or not os.path.isdir(train) else train_labels(ds, folder, train)


def train_labels(ds, folder, train):
    """An evaluation ImageFolder labelled with the training folder's class indices (ImageFolder numbers each folder's
    own sorted class list: val/ a, c would score c as train/'s b). A class the training folder lacks: an error."""
    classes = datasets.folder.find_classes(train)[0]
    if ds.classes == classes:
        return ds
    extra = sorted(set(ds.classes) - set(classes))
    if extra:
        fail(f"{folder} has classes that {train} lacks: {extra[:5]}{' ...' if len(extra) > 5 else ''}; an evaluation "
             "folder must use the training folder's class names (each split is numbered by its own sorted list)")
    idx = {c: i for i, c in enumerate(classes)}
    ds.samples = ds.imgs = [(path, idx[ds.classes[y]]) for path, y in ds.samples]
    ds.targets = [y for _, y in ds.samples]
    print0(f"| {folder}: {len(ds.classes)} of the {len(classes)} training classes, labelled as in {train}")
    ds.classes, ds.class_to_idx = classes, idx
    return ds


def load_rgb(path):
    """An image file as RGB; an unreadable one stops the run with its path (from workers too), never skipped."""
    import numpy as np  # torchvision's dependency
    from PIL import Image
    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            if img.mode.startswith("I"):  # 16-bit (or 32-bit integer) grey: PIL's convert clips it at 255, near white
                img = Image.fromarray(high_byte(torch.from_numpy(np.asarray(img).astype(np.int32))).numpy(), "L")
            return img.convert("RGB")
    except Exception as e:
        fail(f"cannot read image {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")


def build_transform(args, is_train, randaug="rand-m9-mstd0.5-inc1", reprob=0.25, color_jitter=0.3, stats=None):
    """DeiT's training transform (timm; randaug=None / reprob=0 switch RandAugment / erasing off) or evaluation one
    (bicubic resize to floor(input_size / crop_pct), centre crop), normalised with `stats` or data_stats(args)."""
    mean, std = stats or data_stats(args)
    if is_train and randaug:  # timm skips sections it does not know: refuse them instead
        parts = randaug.split("-")
        bad = [p for p in parts[1:] if not re.fullmatch(r"(mstd|mmax|inc|m|n|p)\d[\d.]*|t\w+", p)]
        if parts[0] != "rand" or bad:
            fail(f"--randaug {randaug!r}: expected 'rand' followed by -m<int>, -n<int>, -mstd<float>, -mmax<int>, "
                 f"-inc<0|1>, -p<float> sections (e.g. rand-m9-mstd0.5-inc1; '' = off)"
                 + (f"; unknown: {bad}" if bad else ""))
    if is_train:
        from timm.data import create_transform
        t = create_transform(args.input_size, is_training=True, auto_augment=randaug or None, color_jitter=color_jitter,
                             re_prob=reprob, re_mode="pixel", re_count=1, interpolation="bicubic", mean=mean, std=std)
        for op in (op for tt in t.transforms for op in getattr(tt, "ops", ())):
            if "Posterize" in getattr(op, "name", ""):
                op.aug_fn = _posterize
        return t
    size = math.floor(args.input_size / args.crop_pct)
    return transforms.Compose([transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
                               transforms.CenterCrop(args.input_size), transforms.ToTensor(),
                               transforms.Normalize(mean, std)])


def _posterize(img, bits_to_keep, **_):
    """timm's posterize; 0 bits (magnitude 10, reached by DeiT's m9-mstd0.5): black, as Pillow < 13 (13 raises)."""
    from PIL import Image, ImageOps
    if bits_to_keep >= 8:
        return img
    return ImageOps.posterize(img, bits_to_keep) if bits_to_keep > 0 else Image.new(img.mode, img.size)


def build_supervised_data(args):
    """(train_set, train_loader, val_loader, mixup_fn or None, criterion) of the DeiT recipe (Mixup: soft-target CE)."""
    reference = build_transform(args, True, args.randaug, args.reprob)
    crop, flip, *rest = reference.transforms  # the fast pipelines: crop + flip in the workers, the rest on the device
    train_set, loader = build_train_data(args, reference, CropFlip.like(crop, flip), device_steps(rest),
                                         repeated_aug=args.repeated_aug)
    val_set = build_dataset(args, "val", build_transform(args, False))
    val_loader = build_loader(val_set, args.batch_size, False, args.num_workers)
    if args.mixup <= 0 and args.cutmix <= 0:
        return train_set, loader, val_loader, None, nn.CrossEntropyLoss(label_smoothing=args.smoothing)
    if args.batch_size % 2:
        fail("Mixup / CutMix need an even --batch_size")
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy
    mixup = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, prob=args.mixup_prob,
                  switch_prob=args.mixup_switch_prob, label_smoothing=args.smoothing,
                  num_classes=len(train_set.classes))
    return train_set, loader, val_loader, mixup, SoftTargetCrossEntropy()


def build_loader(dataset, batch_size, train, num_workers=8, seed=0, repeated_aug=False, on_device=None):
    """Training: DistributedSampler even in one process (batch W*b = W processes of b), no partial batch, repeated aug.
    on request. Evaluation: rank r takes r, r + W, ... (no padding: exact at any W). Workers restart: exact resume.
    on_device: what to_device runs on each batch once on the device (the fast pipelines' OnDevice)."""
    world, rank = get_world_size(), get_rank()
    if batch_size < 1:
        fail(f"--batch_size is per process and must be at least 1 (global batch = batch_size x {world} processes)")
    if train:
        if repeated_aug:
            sampler = SeededRepeatAugSampler(dataset, num_replicas=world, rank=rank, shuffle=True,
                                             selected_round=256 if len(dataset) >= 256 * world * 4 else 0)
            sampler.seed = seed
        else:
            sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=world, rank=rank,
                                                          shuffle=True, seed=seed, drop_last=True)
    else:
        sampler = range(rank, len(dataset), world)
    if train and len(sampler) < batch_size:
        fail(f"{len(dataset)} training images give no full batch of {batch_size} per process on {world} process(es)")
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                                         pin_memory=torch.cuda.is_available(), drop_last=train)
    loader.on_device = on_device
    return loader


class SeededRepeatAugSampler(RepeatAugSampler):
    """DeiT's repeated augmentation (timm), whose shuffle is seeded by the epoch alone: here by (seed, epoch)."""
    seed = 0

    def set_epoch(self, epoch):
        super().set_epoch(self.seed * 100_003 + epoch)


def class_subset(labels, fraction, generator):
    """Sorted indices of round(fraction x size) images of each class (at least 1), drawn with `generator`."""
    labels = torch.as_tensor(labels)
    if fraction >= 1:
        return torch.arange(len(labels))
    idx = [(labels == c).nonzero().flatten() for c in labels.unique()]
    return torch.cat([i[torch.randperm(len(i), generator=generator)[:max(1, round(fraction * len(i)))]]
                      for i in idx]).sort().values


# ---- 5b. the fast input pipelines (--pipeline fast / memory) ---------------------------------
# pil, the reference: workers decode with PIL and run the torchvision / timm transforms to normalised float images.
# fast: workers decode with libjpeg-turbo (torchvision.io) and do only the crop and flip, on uint8 tensors
# (torchvision's uint8 resampling kernels, ~4x PIL's); to_device hands the uint8 batch to the loader's OnDevice,
# which runs the rest batched on the device with per-sample parameters (RandAugment, colour jitter, normalisation,
# erasing, the SSL views' colour ops). memory: a split stored at the training size (CIFAR) is decoded once into one
# uint8 tensor on the device and the crop and flip run there too: no loader workers. Every parameter is drawn by the
# reference's own sampler (timm / torchvision get_params, timm's RandAugment object) or from torch's global CPU
# generator, all seeded per (seed, epoch, rank) by seed_everything: resume stays exact, and the draws are the same
# on a CPU and a GPU.
def pipeline(args, memory=True):
    """The pipeline in force: --pipeline, where auto = memory on CUDA for a split stored at --input_size (CIFAR,
    synthetic, fake, an image folder whose first image is input_size square) when the recipe has a batched crop
    (`memory`), fast on CUDA otherwise, pil on the CPU (CPU runs keep their numbers, and there the device part shares
    the cores with the model: bench/bench_data.py measures it slower than PIL at 224 px, faster at 32 px)."""
    mode = getattr(args, "pipeline", "auto")
    stored = (mode == "memory" or (mode == "auto" and torch.cuda.is_available())) and _stored_at_input_size(args)
    if mode == "auto" and not torch.cuda.is_available():
        mode = "pil"
    elif mode == "auto":
        mode = "memory" if memory and stored else "fast"
    if mode == "memory" and not memory:
        fail("--pipeline memory: this recipe has no batched crop on the device (use --pipeline fast)")
    if mode == "memory" and not stored:
        fail(f"--pipeline memory needs a training split stored at --input_size {args.input_size} (CIFAR at 32, "
             f"synthetic at 32, fake, or an image folder of {args.input_size}-pixel squares); use --pipeline fast")
    return mode


def _stored_at_input_size(args):
    s = args.input_size
    if args.dataset in ("cifar10", "cifar100", "synthetic"):
        return s == 32
    if args.dataset == "fake":
        return True
    from PIL import Image
    root = os.path.join(os.path.expanduser(args.data_path or ""), "train")
    try:
        first = sorted(e.path for e in os.scandir(root) if e.is_dir())[0]
        with Image.open(sorted(e.path for e in os.scandir(first) if e.is_file())[0]) as img:
            return img.size == (s, s)
    except (OSError, IndexError):
        return False  # build_dataset reports what is missing


def load_uint8(path):
    """load_rgb of the fast pipelines: a uint8 (3, H, W) tensor. JPEG / PNG / WebP decoded by torchvision.io
    (libjpeg-turbo; a 500 x 375 JPEG 20-25% faster than PIL's decode + convert), other formats by PIL."""
    try:
        with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders for TorchCodec: PIL if they go
            warnings.simplefilter("ignore", DeprecationWarning)
            img = torchvision.io.decode_image(path, mode=torchvision.io.ImageReadMode.RGB)
        return img if img.dtype == torch.uint8 else high_byte(img.to(torch.int32))  # 16-bit PNG: uint16
    except (RuntimeError, AttributeError):  # BMP, TIFF, ... (or no decoder); an unreadable file fails in load_rgb
        return to_uint8(load_rgb(path))


def high_byte(x):
    """16-bit integer levels -> uint8: the high byte, as PIL reads a 16-bit RGB PNG (so both pipelines agree)."""
    return (x.clamp(0, 65535) >> 8).to(torch.uint8)


def to_uint8(img):
    """A PIL image (as RGB) or a uint8 tensor -> uint8 (3, H, W) tensor."""
    if isinstance(img, torch.Tensor):
        return img
    return transforms.functional.pil_to_tensor(img if img.mode == "RGB" else img.convert("RGB"))


class CropFlip:
    """RandomResizedCrop + horizontal flip of uint8 images with the reference's own parameter draws (`get_params`:
    timm's uses Python's random, torchvision's torch's). Called on an image: in a worker, with torchvision's
    antialiased uint8 kernels (PIL's algorithm in 16-bit fixed point: 0.00-0.01 levels from PIL on average, at most
    2). batch(x): equal-size images on the device (the memory pipeline), all the boxes drawn first, then one flip
    draw per image (torch.rand(B)); each image cropped and resized as PIL does (pil_resize: its kernels, fixed point,
    rounding and pass order; bit-exact with Pillow 13 when the height is not reduced, always so in the memory
    pipeline), flipped after the resize as the reference flips."""

    def __init__(self, size, scale, ratio, interpolation, get_params, flip=0.5):
        self.size, self.scale, self.ratio, self.flip = size, scale, ratio, flip
        self.interpolation, self.get_params = interpolation, get_params

    @classmethod
    def like(cls, crop, flip):
        """From the reference's RandomResizedCrop (torchvision's or timm's) and RandomHorizontalFlip."""
        size = crop.size if isinstance(crop.size, (list, tuple)) else (crop.size, crop.size)
        return cls(tuple(size), crop.scale, crop.ratio, crop.interpolation, crop.get_params, flip.p)

    def __call__(self, img):
        img = to_uint8(img)
        i, j, h, w = self.get_params(img, self.scale, self.ratio)
        mode = self.interpolation.value  # uint8 in, uint8 out on the CPU (bilinear / bicubic)
        img = F.interpolate(img[None, :, i:i + h, j:j + w], self.size, mode=mode, antialias=mode != "nearest")[0]
        return img.flip(-1) if torch.rand(1) < self.flip else img

    def batch(self, x):
        box = torch.tensor([self.get_params(x[0], self.scale, self.ratio) for _ in range(len(x))], dtype=torch.float64)
        flip = torch.rand(len(x)) < self.flip
        return pil_resize(x, *params_to(x, box, flip), self.size, self.interpolation.value)


def pil_resize_weights(start, length, size, out, mode):
    """Resample.c's coefficients of Image.crop + Image.resize along one axis, per image: (n, out, size) integer
    weights in units of 2^-22 (PIL's fixed point), zero outside the box [start, start + length) of each line of
    `size` pixels. Output pixel o samples the box at c = (o + 0.5) length / out with PIL's filter (bicubic: Keys'
    cubic, a = -0.5, support 2; bilinear: the triangle, support 1; both stretched by length / out above 1: the
    antialiasing) over the box pixels whose centres PIL's rounded range takes; each row normalised to sum 1, then
    rounded half away from zero. nearest: the box pixel under c. start, length: (n,) float64 on the device."""
    scale = (length / out)[:, None, None]
    centre = (torch.arange(out, device=length.device, dtype=length.dtype)[:, None] + 0.5) * scale  # (n, out, 1)
    if mode == "nearest":
        u, w = torch.floor(centre), torch.ones_like(centre)
    else:  # the same double-precision operations as PIL, in its order, over at most `taps` pixels from the first
        support = 2.0 if mode == "bicubic" else 1.0
        taps = math.ceil(support * max(1.0, size / out)) * 2 + 1  # PIL's most for a box of at most `size` pixels
        stretch = scale.clamp(min=1.0)
        first = torch.floor(centre - support * stretch + 0.5).clamp(min=0)
        end = torch.minimum(torch.floor(centre + support * stretch + 0.5), length[:, None, None])
        u = first + torch.arange(taps, device=length.device, dtype=length.dtype)  # (n, out, taps): in the box
        t = ((u - centre) + 0.5).mul_(1.0 / stretch).abs_()
        if mode == "bicubic":  # Keys' cubic, a = -0.5, as PIL writes it
            near, far = (1.5 * t - 2.5) * t * t + 1, (((t - 5) * t + 8) * t - 4) * -0.5
            w = torch.where(t < 1, near, torch.where(t < 2, far, 0.0))
        else:
            w = (1 - t).clamp_(min=0)
        w = torch.where(u < end, w, 0.0)
        total = w.sum(-1, keepdim=True)
        w = torch.where(total != 0, w / total, w)
    w = w * 2.0 ** 22
    w = torch.where(w < 0, torch.ceil(w - 0.5), torch.floor(w + 0.5))
    index = (u + start[:, None, None]).clamp_(max=size - 1).long()  # taps past the box end: weight 0
    return torch.zeros(*w.shape[:2], size, device=w.device, dtype=w.dtype).scatter_add_(2, index, w)


def pil_resize(x, box, flip, size, mode="bicubic"):
    """torchvision's resized_crop + hflip of PIL images (Image.crop(box), Image.resize(size, mode), flip) on a batch
    of uint8 images (n, C, H, W) with a box (top, left, height, width: (n, 4) float64) and a flip flag (n,) each,
    all on the device: PIL's two passes as batched matrix products, horizontal first, each a fixed-point sum
    rounded half up and clipped to 0-255 (exact in float64; float32 on MPS), as Pillow <= 12 always does. Pillow 13
    runs the vertical pass first for some boxes whose height it reduces (all of those whose width it does not):
    there 0.05-0.1 levels apart on average, at most 1 (bilinear), 3 (bicubic, smooth images) or ~20 (bicubic,
    noise); never in the memory pipeline, whose boxes are never larger than the output. -> float (0-255)."""
    dtype = torch.float32 if x.device.type == "mps" else torch.float64
    i, j, h, w = box.to(dtype).unbind(1)
    rows = pil_resize_weights(i, h, x.shape[2], size[0], mode)
    cols = pil_resize_weights(j, w, x.shape[3], size[1], mode)
    cols = torch.where(flip[:, None, None], cols.flip(1), cols)
    x = torch.einsum("nchw,nqw->nchq", x.to(dtype), cols).add_(2.0 ** 21).mul_(2.0 ** -22).floor_().clamp_(0, 255)
    return torch.einsum("nph,nchq->ncpq", rows, x).add_(2.0 ** 21).mul_(2.0 ** -22).floor_().clamp_(0, 255).float()


class MemoryImages(torch.utils.data.Dataset):
    """The memory pipeline's split: decoded once (by the loader's workers) into one uint8 tensor (N, 3, H, W), 150 MB
    for CIFAR's 50,000 images, moved to the device at the first batch. Items are (index, target): the loader batches
    indices (the same sampler, so the same order as the other pipelines) and OnDevice gathers the images."""

    def __init__(self, dataset, num_workers=0):
        parts = torch.utils.data.DataLoader(dataset, batch_size=256, num_workers=num_workers)
        try:
            images, targets = zip(*parts)
        except RuntimeError as e:
            fail(f"--pipeline memory needs every training image at one size ({str(e).splitlines()[0]}); "
                 f"use --pipeline fast")
        self.images, self.targets = torch.cat(images), torch.cat(targets).tolist()
        self.classes = getattr(dataset, "classes", None)

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return i, self.targets[i]

    def gather(self, index):
        self.images = self.images.to(index.device)
        return self.images[index]


class OnDevice:
    """The device end of the fast / memory pipelines, run by to_device on each batch: (memory) gather the images,
    crop.batch; then each of `steps` (uint8 -> normalised float, per-sample augmentation). It times its own work for
    the Meter's data share without waiting for the device: on CUDA a pair of events around each batch's work, read
    by seconds() (which waits for them; the Meter calls it at its printed lines); elsewhere the host's time."""

    def __init__(self, steps, crop=None, memory=None):
        self.steps, self.crop, self.memory = list(steps), crop, memory
        self.done, self.events = 0.0, []  # seconds of finished work; CUDA event pairs not read yet

    def __call__(self, batch):
        cuda = (batch[0] if isinstance(batch, (list, tuple)) else batch).device.type == "cuda"
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t = time.perf_counter()
        if self.memory is not None:
            batch = self.crop.batch(self.memory.gather(batch))
        for step in self.steps:
            batch = step(batch)
        if not cuda:
            self.done += time.perf_counter() - t
            return batch
        end.record()
        self.events.append((start, end))
        while len(self.events) > 1 and self.events[0][1].query():  # fold the finished pairs (query does not wait)
            start, end = self.events.pop(0)
            self.done += start.elapsed_time(end) / 1000
        return batch

    def seconds(self):
        """The time spent so far (waits for the device to finish the queued batches' device part)."""
        for start, end in self.events:
            end.synchronize()
            self.done += start.elapsed_time(end) / 1000
        self.events = []
        return self.done


def build_train_data(args, reference, crop, steps, wrap=None, repeated_aug=False):
    """(train_set, loader) of the --pipeline in force. pil: `reference` (image -> normalised tensor) in the workers;
    fast: `crop` (image -> uint8: the geometric part) in the workers, `steps` on the device; memory: the split decoded
    once, crop.batch and `steps` on the device. wrap: dataset -> dataset before the loader (subsets, relabelling)."""
    mode = pipeline(args, memory=getattr(crop, "batch", None) is not None)
    transform = {"pil": reference, "fast": crop, "memory": to_uint8}[mode]
    dataset = build_dataset(args, "train", transform, uint8=mode != "pil")
    dataset = wrap(dataset) if wrap else dataset
    if mode == "memory":
        dataset = MemoryImages(dataset, args.num_workers)
    loader = build_loader(dataset, args.batch_size, True, 0 if mode == "memory" else args.num_workers, args.seed,
                          repeated_aug, on_device=None if mode == "pil" else
                          OnDevice(steps, crop, dataset) if mode == "memory" else OnDevice(steps))
    print0(f"| input pipeline: {mode}")
    return dataset, loader


def params_to(x, *tensors):
    """CPU-drawn per-sample parameters to x's device (asynchronously: no host sync)."""
    return [t.to(x.device, non_blocking=True) for t in tensors]


class Normalise:
    """ToTensor + Normalize on the device: (x / 255 - mean) / std, the reference's operations (bit-exact), on
    (..., 3, H, W)."""

    def __init__(self, mean, std):
        self.mean, self.std = (torch.as_tensor(v, dtype=torch.float32).view(3, 1, 1) for v in (mean, std))

    def __call__(self, x):
        if self.mean.device != x.device:
            self.mean, self.std = self.mean.to(x.device), self.std.to(x.device)
        return x.float().div(255).sub(self.mean).div(self.std)


def luma(x):
    """PIL's RGB -> L (16-bit fixed point, rounded) of integer-valued float images (n, 3, H, W) -> (n, 1, H, W)."""
    r, g, b = x.unbind(1)
    return torch.floor((r * 19595 + g * 38470 + b * 7471 + 32768) / 65536).unsqueeze(1)


def blend(degenerate, x, factor):
    """PIL's ImageEnhance: degenerate + factor (x - degenerate) in float32, truncated, clipped (bit-exact)."""
    return torch.trunc(degenerate + factor.view(-1, 1, 1, 1) * (x - degenerate)).clamp(0, 255)


def enhance(kind, x, factor):
    """PIL's ImageEnhance.<kind>(img).enhance(factor) on integer-valued float images (n, 3, H, W), a factor each."""
    if kind == "Brightness":
        deg = torch.zeros_like(x)
    elif kind == "Color":
        deg = luma(x).expand_as(x)
    elif kind == "Contrast":  # a grey image at the rounded mean of L
        deg = torch.floor(luma(x).double().mean((1, 2, 3)) + 0.5).float().view(-1, 1, 1, 1).expand_as(x)
    else:  # Sharpness: ImageFilter.SMOOTH (3 x 3 ones, centre 5, / 13; never a tie when rounded), border pixels kept
        deg = x.clone()
        deg[..., 1:-1, 1:-1] = torch.floor((F.avg_pool2d(x, 3, 1) * 9 + 4 * x[..., 1:-1, 1:-1]) / 13 + 0.5)
    return blend(deg, x, factor)


def adjust_hue(x, hue):
    """Hue rotation by `hue` turns (per sample) in float HSV, rounded back to integers (PIL: in 8-bit HSV)."""
    x = x / 255
    maxc, minc = x.amax(1), x.amin(1)
    cr = maxc - minc
    s = cr / torch.where(maxc > 0, maxc, 1)
    rc, gc, bc = ((maxc - c) / torch.where(cr > 0, cr, 1) for c in x.unbind(1))
    r, g = x[:, 0], x[:, 1]
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2 + rc - bc, 4 + gc - rc))
    h = (h / 6 + 1 + hue.view(-1, 1, 1)) % 1.0 * 6
    i = torch.floor(h)
    f, i = h - i, i.long() % 6
    p, q, t = maxc * (1 - s), maxc * (1 - s * f), maxc * (1 - s * (1 - f))
    pick = lambda *c: torch.stack(c, 1).gather(1, i[:, None]).squeeze(1)  # noqa: E731
    rgb = torch.stack([pick(maxc, q, p, p, t, maxc), pick(t, maxc, maxc, q, p, p), pick(p, p, t, maxc, maxc, q)], 1)
    return (rgb * 255).round().clamp(0, 255)


class ColorJitter:
    """torchvision's ColorJitter (applied with probability p, as RandomApply) on a batch: per-sample factors and a
    per-sample random order; brightness, contrast and saturation as PIL computes them (bit-exact), hue in float HSV."""

    def __init__(self, brightness=None, contrast=None, saturation=None, hue=None, p=1.0):
        self.ranges, self.p = [brightness, contrast, saturation, hue], p

    @classmethod
    def like(cls, t, p=1.0):
        return cls(t.brightness, t.contrast, t.saturation, t.hue, p)

    def __call__(self, x):
        x, n = x.float(), len(x)
        on, order = torch.rand(n) < self.p, torch.rand(n, 4).argsort(1)
        factors = [None if r is None else r[0] + (r[1] - r[0]) * torch.rand(n) for r in self.ranges]
        for k in range(4):
            for op, f in enumerate(factors):
                idx = (on & (order[:, k] == op)).nonzero().squeeze(1)
                if f is None or len(idx) == 0:
                    continue
                i, fi = params_to(x, idx, f[idx])
                x[i] = adjust_hue(x[i], fi) if op == 3 else enhance(("Brightness", "Contrast", "Color")[op], x[i], fi)
        return x


class DeviceRandAugment:
    """timm's RandAugment on a batch of integer-valued float images (0-255) on the device. timm's own RandAugment
    object draws every sample's ops and arguments (op set, per-op probability, magnitude noise, signs: its
    distribution by construction) with its ops swapped for recorders; the ops then run batched, grouped by position
    and colour op, the geometric ops of a position together (per filter timm drew and fill colour). Colour ops equal
    PIL's bit for bit, and so do rotate / shear / translate (pil_affine: PIL's affine filters, bicubic with a = -1,
    in float64, truncated; nearest: PIL's generic path, whose fixed-point variant for rotations and shears can pick
    the neighbouring pixel)."""
    GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY", "TranslateXRel", "TranslateYRel")
    COLOUR = ("AutoContrast", "Equalize", "Invert", "Posterize", "Solarize", "SolarizeAdd", "Color", "Contrast",
              "Brightness", "Sharpness")

    def __init__(self, randaugment):
        import copy
        self.ra = copy.deepcopy(randaugment)
        for op in self.ra.ops:
            if self.kind(op.name) not in self.GEOMETRIC + self.COLOUR:
                fail(f"RandAugment op {op.name} has no device version: use --pipeline pil")
            op.aug_fn = functools.partial(self.record, op.name)

    @staticmethod
    def record(name, log, *args, **kwargs):
        """An op's stand-in: note what timm drew (a random resampling filter as timm's geometric ops choose it)."""
        geometric = DeviceRandAugment.kind(name) in DeviceRandAugment.GEOMETRIC
        if geometric and isinstance(kwargs.get("resample"), (list, tuple)):
            kwargs = {**kwargs, "resample": random.choice(kwargs["resample"])}
        return log + [(name, args, kwargs)]

    @staticmethod
    def kind(name):
        return name.replace("Increasing", "").replace("Original", "")

    def __call__(self, x):
        x = x.float()
        draws = [self.ra([]) for _ in range(len(x))]  # per image: [(op name, args, kwargs), ...] of the ops applied
        for k in range(max(map(len, draws), default=0)):
            # a colour op's images together; every geometric op of this position together (each image its own matrix),
            # per filter and fill colour: one affine resampling instead of one per op
            groups = {}  # key: [(image, op kind, its argument, kwargs), ...]
            for b, d in enumerate(draws):
                if k < len(d):
                    name, args, kwargs = d[k]
                    kind = self.kind(name)
                    key = (("affine", kwargs.get("resample", 3), tuple(kwargs.get("fillcolor") or (128, 128, 128)))
                           if kind in self.GEOMETRIC else (kind,))
                    groups.setdefault(key, []).append((b, kind, args[0] if args else 0.0, kwargs))
            for key, items in groups.items():
                (i,) = params_to(x, torch.tensor([b for b, *_ in items]))
                if key[0] == "affine":
                    x[i] = self.affine(x[i], [(kind, v) for _, kind, v, _ in items], key[1], key[2])
                else:
                    x[i] = self.apply(key[0], x[i], [v for _, _, v, _ in items], items[0][3])
        return x

    @staticmethod
    def affine(x, ops, resample, fill):
        """Geometric ops [(kind, argument), ...], one per image of x, as one PIL affine resampling (each image its own
        matrix, drawn on the host and sent without blocking)."""
        H, W = x.shape[2:]
        matrices = torch.tensor([pil_affine_matrix(kind, v, W, H) for kind, v in ops], dtype=torch.float64)
        return pil_affine(x, *params_to(x, matrices, torch.tensor(fill, dtype=torch.float64)), resample)

    @staticmethod
    def apply(kind, x, a, kwargs):
        """Op `kind` on the images x (n, 3, H, W) with the arguments a (n floats, on the host) and timm's kwargs."""
        if kind in DeviceRandAugment.GEOMETRIC:
            return DeviceRandAugment.affine(x, [(kind, v) for v in a], kwargs.get("resample", 3),
                                            kwargs.get("fillcolor") or (128, 128, 128))
        (a,) = params_to(x, torch.tensor(a, dtype=torch.float64))
        if kind == "Invert":
            return 255 - x
        if kind == "Posterize":  # timm's levels reach 0 bits: black, as common._posterize
            mask = torch.where(a >= 8, 255, 256 - 2 ** (8 - a.clamp(0, 8))).long()
            return (x.long() & mask.view(-1, 1, 1, 1)).float()
        if kind == "Solarize":
            return torch.where(x >= a.view(-1, 1, 1, 1), 255 - x, x)
        if kind == "SolarizeAdd":
            return torch.where(x < kwargs.get("thresh", 128), (x + a.float().view(-1, 1, 1, 1)).clamp(max=255), x)
        if kind in ("Color", "Contrast", "Brightness", "Sharpness"):
            return enhance(kind, x, a.float())
        if kind == "AutoContrast":  # per channel: [lo, hi] -> [0, 255], int() of the float64 line as PIL's table
            lo, hi = x.amin((2, 3), keepdim=True).double(), x.amax((2, 3), keepdim=True).double()
            scale = torch.full_like(hi, 255) / torch.where(hi > lo, hi - lo, 1)  # (255 / t is 255 x (1 / t) in torch)
            out = torch.trunc(x.double() * scale - lo * scale).clamp(0, 255).float()
            return torch.where(hi > lo, out, x)
        if kind == "Equalize":  # PIL's table: (step // 2 + pixels below) // step, step = (pixels - top bin) // 255
            v = x.long().flatten(2)
            hist = torch.zeros(*v.shape[:2], 256, dtype=torch.long, device=x.device)
            hist.scatter_add_(2, v, torch.ones_like(v))
            step = (v.shape[2] - hist.gather(2, v.amax(2, keepdim=True))) // 255
            lut = ((step // 2 + hist.cumsum(2) - hist) // step.clamp(min=1)).clamp(max=255)
            return torch.where(step > 0, lut.gather(2, v), v).view_as(x).float()


def pil_affine_matrix(kind, v, W, H):
    """The matrix (6 floats) that timm's op `kind` with argument v hands to PIL's Image.transform(AFFINE) for a W x H
    image (output pixel centre -> input point); Rotate: Image.rotate's, about the centre, rounded as PIL rounds it."""
    if kind == "Rotate":
        t = -math.radians(v % 360.0)
        c, s, d = round(math.cos(t), 15), round(math.sin(t), 15), round(-math.sin(t), 15)
        return c, s, c * -(W / 2) + s * -(H / 2) + 0.0 + W / 2, d, c, d * -(W / 2) + c * -(H / 2) + 0.0 + H / 2
    m = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    m[{"ShearX": 1, "ShearY": 3, "TranslateX": 2, "TranslateY": 5, "TranslateXRel": 2, "TranslateYRel": 5}[kind]] = (
        v * W if kind == "TranslateXRel" else v * H if kind == "TranslateYRel" else v)
    return tuple(m)


def _cubic(v1, v2, v3, v4, d):
    """PIL's affine bicubic (Keys' cubic, a = -1) at d in [0, 1) between v2 and v3: v2 + d (p2 + d (p3 + d p4)), with
    p2 = -v1 + v3, p3 = 2 (v1 - v2) + v3 - v4, p4 = -v1 + v2 - v3 + v4, each rounding as PIL's (in place: fewer
    allocations, the same operations)."""
    p3 = (v1 - v2).mul_(2).add_(v3).sub_(v4)
    return (v2 - v1).sub_(v3).add_(v4).mul_(d).add_(p3).mul_(d).add_(v3 - v1).mul_(d).add_(v2)


def pil_affine(x, matrices, fill, resample=3):
    """PIL's Image.transform(size, AFFINE, matrix, resample, fillcolor=fill) (Geometry.c's generic transform) on a
    batch of integer-valued images (n, C, H, W), a matrix each ((n, 6) float64) and one fill colour ((C,)), all on
    the device: output pixel (x, y) reads the input at (m0 (x + 0.5) + m1 (y + 0.5) + m2, m3 (x + 0.5) + ...), the
    fill colour outside [0, W) x [0, H); inside, bilinear (2 x 2 taps) or bicubic (4 x 4, a = -1) around that point
    with the taps clamped to the image, in float64 (float32 on MPS), truncated to 0-255 as PIL's cast to uint8;
    nearest (0): the pixel under the point. -> float."""
    n, C, H, W = x.shape
    dtype = torch.float32 if x.device.type == "mps" else torch.float64
    m = matrices.to(dtype).view(n, 6, 1, 1).unbind(1)
    xs, ys = (torch.arange(k, device=x.device, dtype=dtype) + 0.5 for k in (W, H))
    u, v = m[0] * xs + m[1] * ys[:, None] + m[2], m[3] * xs + m[4] * ys[:, None] + m[5]  # (n, H, W)
    inside = ((u >= 0) & (u < W) & (v >= 0) & (v < H))[:, None]
    flat = x.to(dtype).flatten(2)

    def at(rows, cols):  # every tap in one gather: row offsets (n, r, H, W), columns (n, c, H, W) -> (n, C, r, c, H, W)
        index = (rows[:, :, None] + cols[:, None]).view(n, 1, -1).expand(-1, C, -1)
        return flat.gather(2, index).view(n, C, rows.shape[1], cols.shape[1], H, W)
    if int(resample) == 0:
        out = at(torch.floor(v).long().clamp_(0, H - 1).mul_(W)[:, None], torch.floor(u).long().clamp_(0, W - 1)[:, None])
        out = out[:, :, 0, 0]
    else:
        u, v = u - 0.5, v - 0.5
        x0, y0 = torch.floor(u), torch.floor(v)
        dx, dy = (u - x0)[:, None, None], (v - y0)[:, None]
        offsets = torch.arange(-1, 3, device=x.device) if int(resample) == 3 else torch.arange(2, device=x.device)
        offsets = offsets.view(-1, 1, 1)
        cols = (x0.long()[:, None] + offsets).clamp_(0, W - 1)
        rows = (y0.long()[:, None] + offsets).clamp_(0, H - 1).mul_(W)
        taps = at(rows, cols).unbind(3)  # per column tap: (n, C, rows, H, W); each row interpolated along x at once
        if int(resample) == 2:
            lerp = lambda a, b, d: (b - a).mul_(d).add_(a)  # noqa: E731  (a + (b - a) d)
            out = lerp(*lerp(*taps, dx).unbind(2), dy)
        else:
            out = _cubic(*_cubic(*taps, dx).unbind(2), dy)
    return torch.where(inside, out.trunc_().clamp_(0, 255), fill.to(dtype).view(1, C, 1, 1)).float()


def device_steps(reference):
    """The device version of a reference transform's steps after the crop and flip (timm's DeiT transform:
    RandAugment or ColorJitter, ToTensor, Normalize, RandomErasing), in its order."""
    from timm.data.auto_augment import RandAugment
    from timm.data.random_erasing import RandomErasing
    steps = []
    for t in reference:
        if isinstance(t, RandAugment):
            steps.append(DeviceRandAugment(t))
        elif isinstance(t, transforms.ColorJitter):
            steps.append(ColorJitter.like(t))
        elif isinstance(t, transforms.Normalize):
            steps.append(Normalise(t.mean, t.std))
        elif isinstance(t, RandomErasing):  # timm's, as its PrefetchLoader runs it: per image, noise on the device
            steps.append(functools.partial(_erase, t))
        elif type(t).__name__ not in ("ToTensor", "MaybeToTensor"):
            fail(f"{type(t).__name__} has no device version: use --pipeline pil")
    return steps


def _erase(erasing, x):
    erasing.device = x.device  # timm's RandomErasing draws its noise on .device
    return erasing(x)


# ---- 6. training utilities ------------------------------------------------------------------
def add_run_args(parser):
    """Run-management flags shared by every training script (not hyperparameters)."""
    g = parser.add_argument_group("run")
    g.add_argument("--output_dir", default="output", type=str, help="checkpoint.pth, log.txt, args.json go here")
    g.add_argument("--resume", default="auto", type=str, help="'auto': continue from output_dir/checkpoint.pth if "
                   "present; 'none': start fresh (refused if output_dir holds a checkpoint); or a checkpoint path")
    g.add_argument("--seed", default=0, type=int)
    g.add_argument("--amp", default="bf16", choices=["bf16", "fp16", "off"],
                   help="mixed precision on CUDA (CPU: always off)")
    g.add_argument("--log_every", default=50, type=int, help="print a training line every N iterations")
    g.add_argument("--save_every", default=0, type=int,
                   help="also keep checkpoint{epoch:04}.pth every N epochs (0: never)")
    g.add_argument("--trust_checkpoint", action="store_true",
                   help="load files that hold Python objects beyond tensors (full unpickling runs code from the file)")
    g.add_argument("--pipeline", default="auto", choices=["auto", "fast", "memory", "pil"],
                   help="training input: pil = PIL transforms in the loader workers (the reference); fast = workers "
                   "decode (libjpeg-turbo) and crop uint8 images, the device does the rest per sample (RandAugment, "
                   "colour, erasing, normalisation); memory = the split decoded once onto the device, crops there too "
                   "(CIFAR); auto = memory or fast on CUDA, pil on the CPU")
    g.add_argument("--compile", action="store_true", help="torch.compile the student's and teachers' blocks")
    g.add_argument("--compile_backend", default="inductor", help="torch.compile backend (aot_eager: no code generation)")
    g.add_argument("--compile_mode", default=None, help="torch.compile mode (inductor); the CUDA-graph modes "
                   "reduce-overhead and max-autotune are refused (the taps keep tensors that a replay overwrites)",
                   choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"])
    return g


def compile_models(args, *models):
    """--compile: torch.compile each model's repeated blocks in place (a timm ViT's `blocks`, else every top-level child
    with weights), so forward, forward_features and the ViTTaps hooks all run compiled and one graph serves every
    block of a shape. Hooks are guarded: taps opened or closed later recompile instead of being silently skipped."""
    if not args.compile:
        return
    cfg = torch._dynamo.config
    cfg.skip_nnmodule_hook_guards = False
    limit = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"  # the name before torch 2.6
    setattr(cfg, limit, max(getattr(cfg, limit), 64))  # one code object for all blocks: (widths x tap layouts)
    for model in {id(m): m for m in models if m is not None}.values():
        regions = unwrap(model).blocks if hasattr(unwrap(model), "blocks") else \
            [m for m in unwrap(model).children() if next(m.parameters(), None) is not None]
        for m in regions:
            m.compile(backend=args.compile_backend, mode=args.compile_mode)


def seed_everything(seed, epoch=0):
    """Seed torch / random / numpy with (seed, epoch, rank), every epoch: a resumed run draws the same numbers."""
    s = seed + 1000 * epoch + get_rank()
    torch.manual_seed(s)
    random.seed(s)
    with suppress(ImportError):
        import numpy as np
        np.random.seed(s % 2 ** 32)


def cosine_schedule(step, total_steps, base, final=0.0, warmup_steps=0, start=0.0):
    """Linear warm-up start -> base over warmup_steps, then half-cosine to `final` at total_steps; pure in `step`."""
    if step < warmup_steps:
        return start + (base - start) * step / warmup_steps
    t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return final + (base - final) * 0.5 * (1.0 + math.cos(math.pi * t))


def lr_schedule(base, final, total_steps, warmup_steps=0, start=0.0):
    """step -> lr: cosine_schedule with these settings."""
    return lambda step: cosine_schedule(step, total_steps, base, final, warmup_steps, start)


def to_device(batch, device, loader):
    """A loader's (images, target) on `device` (images: a batch, or a list of views), then the fast pipelines'
    device end when the loader has one (loader.on_device: crop, flip, RandAugment, normalisation on the device)."""
    images, target = batch
    images = ([v.to(device, non_blocking=True) for v in images] if isinstance(images, (list, tuple))
              else images.to(device, non_blocking=True))
    target = target.to(device, non_blocking=True)
    if getattr(loader, "on_device", None) is not None:
        images = loader.on_device(images)
    return images, target


def resolve_lr(args, accum_iter=1, base_batch=256):
    """--lr, else --blr x global batch (processes x batch x accum_iter) / base_batch; printed. args stays unchanged."""
    global_batch = args.batch_size * get_world_size() * accum_iter
    if args.lr is not None:
        print0(f"| lr {args.lr:.3g} (given; global batch {global_batch})")
        return args.lr
    lr = args.blr * global_batch / base_batch
    print0(f"| lr {lr:.3g} = blr {args.blr:.3g} x global batch {global_batch} / {base_batch}")
    return lr


def param_groups(model, weight_decay, skip_listed=True):
    """AdamW groups, frozen parameters left out: no weight decay on 1-D parameters and, when skip_listed, the names in
    a submodule's no_weight_decay() (timm ViT: pos_embed, cls_token; MAE's code, used by AttnDistill, decays them)."""
    skip = set()
    for prefix, m in model.named_modules() if skip_listed else ():
        if hasattr(m, "no_weight_decay") and callable(m.no_weight_decay):
            skip |= {f"{prefix}.{n}" if prefix else n for n in m.no_weight_decay()}
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or n.endswith(".bias") or n in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def autocast(device, amp="bf16"):
    """bf16 (or fp16) autocast on CUDA; a nullcontext on CPU or with --amp off."""
    if device.type != "cuda" or amp == "off":
        return nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def grad_scaler(device, amp):
    """A GradScaler that is active only for fp16 on CUDA (a no-op otherwise)."""
    return torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and amp == "fp16")


def kd_loss(logits_s, logits_t, temperature, keep=None, rows=False):
    """Hinton KD: KL(softmax(t / T) || softmax(s / T)), batch mean, times T^2 (fp32, teacher detached). keep: a bool
    mask of the rows to average over (SSKD's selective transfer; 0 when none is kept), a masked mean: no host sync.
    rows=True: each row's KL times T^2 (R,), for a caller that weighs the rows itself (one KL for several terms)."""
    log_s, log_t = ((z.float() / temperature).log_softmax(1) for z in (logits_s, logits_t.detach()))
    if keep is None and not rows:
        return F.kl_div(log_s, log_t, reduction="batchmean", log_target=True) * temperature ** 2
    kl = F.kl_div(log_s, log_t, reduction="none", log_target=True).sum(1)
    if rows:
        return kl * temperature ** 2
    return (kl * keep).sum() / keep.sum().clamp_min(1) * temperature ** 2


def token_loss(dist_logits, teacher_logits, kind="hard", temperature=1.0):
    """DeiT's distillation-token loss. hard: cross-entropy to the teacher's argmax; soft: KL(softmax(t / T) ||
    softmax(s / T)) summed, divided by the number of logits (B x C) as DeiT's code does, times T^2."""
    s, t = dist_logits.float(), teacher_logits.float().detach()
    if kind == "hard":
        return F.cross_entropy(s, t.argmax(1))
    kl = F.kl_div((s / temperature).log_softmax(1), (t / temperature).log_softmax(1), reduction="sum", log_target=True)
    return kl * temperature ** 2 / s.numel()


def accuracy(logits, target, topk=(1, 5)):
    """Number of correct predictions for each k (sums, not percentages)."""
    maxk = min(max(topk), logits.shape[1])
    hit = logits.topk(maxk, 1).indices.eq(target[:, None])
    return [hit[:, :min(k, maxk)].any(1).sum().item() for k in topk]


@torch.no_grad()
def evaluate(model, loader, device, amp="bf16", heads=()):
    """Top-1 / top-5 (%) and mean CE over the whole evaluation set, exact at any world size. With `heads` the model
    returns {"logits": ..., NAME: logits for NAME in heads}: each NAME's top-1 is added as acc1_NAME, in the same pass."""
    model.eval()
    stats = torch.zeros(4 + len(heads), device=device, dtype=torch.float64)
    for images, target in progress(loader, "eval"):
        images, target = images.to(device, non_blocking=True), target.to(device, non_blocking=True)
        with autocast(device, amp):
            out = model(images)
        out = {k: v.float() for k, v in (out if heads else {"logits": out}).items()}
        logits = out["logits"]
        stats += torch.tensor([*accuracy(logits, target), F.cross_entropy(logits, target, reduction="sum").item(),
                               len(target), *(accuracy(out[k], target, (1,))[0] for k in heads)], device=device,
                              dtype=torch.float64)
    all_reduce_sum(stats)
    n = max(stats[3].item(), 1)
    return {"acc1": 100 * stats[0].item() / n, "acc5": 100 * stats[1].item() / n, "loss": stats[2].item() / n,
            **{f"acc1_{k}": 100 * v.item() / n for k, v in zip(heads, stats[4:])}}


def atomic_save(obj, path):
    """Rank 0: torch.save to a temporary file, then rename, so a job killed while saving leaves no truncated file. A
    failed write (a full disk: torch's RuntimeError or an OSError) removes the temporary file, leaves `path` as it
    was and is a UserError."""
    if not is_main_process():
        return
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        with suppress(OSError):
            os.remove(tmp)
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e).strip().splitlines()[-1][:120]
        free = "?"
        with suppress(OSError):
            import shutil
            free = f"{shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free / 2 ** 20:.0f} MB"
        fail(f"could not write {path} ({type(e).__name__}: {why}; {free} free there): the partial file was removed and "
             f"{'the previous ' + os.path.basename(path) + ' is unchanged' if os.path.exists(path) else 'nothing was saved'}"
             "; free some space or pick another folder")


CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch.compile modes that capture CUDA graphs: refused

# flags that may change between a run and its resumption (--num_workers may not: the augmentation stream depends on it)
RESUME_FREE = ("resume", "output_dir", "data_path", "log_every", "save_every", "download", "trust_checkpoint",
               "compile", "compile_backend", "compile_mode")


_LOCK = {}  # the output_dir lock this process holds: {"dir": its real path, "file": the open lock file}


def lock_output_dir(out, hold=True):
    """One run per output_dir: rank 0 holds an exclusive flock on output_dir/.lock until this process starts another
    run or ends; the kernel drops it when the process dies, so a killed run leaves nothing stuck. A second run into
    the folder stops with one line. hold=False only looks (an existing lock file, nothing written). No lock where
    flock is missing (Windows) or the folder is not writable (start_run reports that)."""
    try:
        import fcntl
    except ImportError:
        return
    path, lock = os.path.realpath(out), os.path.join(out, ".lock")
    if not is_main_process() or _LOCK.get("dir") == path or not (hold or os.path.isfile(lock)):
        return
    try:
        f = open(lock, "a+" if hold else "r")
    except OSError:
        return
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        fail(f"--output_dir {out} is in use by another run (it holds {lock}); wait for it to end or pick another "
             "--output_dir")
    if not hold:
        return f.close()
    release_output_dir()  # this process's previous run is over
    _LOCK.update(dir=path, file=f)  # the file stays empty: a folder copied with it is unchanged by a later run


def release_output_dir():
    """Let go of the output_dir this process holds, if any."""
    if _LOCK:
        _LOCK.pop("file").close()
        _LOCK.clear()


def resume_checkpoint(args, script, free=()):
    """Read only: the checkpoint to resume or None. --resume auto: output_dir/checkpoint.pth if any (same script, args
    equal up to RESUME_FREE and `free`); none: refused if there is one; PATH: same script, changed args printed."""
    if getattr(args, "epochs", 1) < 1:
        fail(f"--epochs must be at least 1, got {args.epochs}")
    if args.compile and args.compile_backend not in torch._dynamo.list_backends(exclude_tags=()):
        fail(f"--compile_backend {args.compile_backend} is not a torch.compile backend (e.g. inductor, aot_eager)")
    if args.compile and args.compile_mode in CUDA_GRAPH_MODES:
        fail(f"--compile_mode {args.compile_mode} replays CUDA graphs, whose outputs are overwritten by the next replay, "
             "while the distillation taps keep block outputs and attention maps across forwards; use default or "
             "max-autotune-no-cudagraphs")
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        fail(f"--output_dir {args.output_dir} exists and is not a folder")
    lock_output_dir(args.output_dir, hold=False)  # another run writing here: refused before any work (start_run locks)
    own = os.path.join(args.output_dir, "checkpoint.pth")
    free = set(RESUME_FREE) | set(free)
    current = {k: v for k, v in vars(args).items() if k not in free}
    if args.resume in ("none", "") and os.path.exists(own):
        fail(f"{own} exists; use --resume auto to continue it or pick another --output_dir (nothing was overwritten)")
    path = own if args.resume == "auto" and os.path.exists(own) else None
    if args.resume not in ("none", "", "auto"):
        path = args.resume
        if not os.path.isfile(path):
            fail(f"--resume {path}: no such checkpoint")
    if path is None:
        return None
    ckpt = read_checkpoint(path, args.trust_checkpoint)
    if not isinstance(ckpt, dict) or "script" not in ckpt or "epoch" not in ckpt:
        fail(f"--resume {path} is not a training checkpoint of this repository (no 'script' / 'epoch' entries)")
    if ckpt["script"] != script:
        fail(f"{path} is a checkpoint of {ckpt['script']}, not {script}; use another --output_dir")
    old = {k: v for k, v in ckpt.get("args", {}).items() if k not in free}
    diff = sorted(k for k in set(old) | set(current) if old.get(k) != current.get(k))
    if diff:
        listing = ", ".join(f"{k}: {old.get(k)!r} -> {current.get(k)!r}" for k in diff[:6])
        if args.resume == "auto":
            fail(f"{own} was written with other arguments ({listing}); pass --resume {own} to continue it "
                 f"with the new ones, or pick another --output_dir")
        print0(f"| resuming {path} with changed arguments: {listing}")
    print0(f"| resuming from {path} at epoch {ckpt['epoch']}")
    ckpt["_source"] = path  # for restore's messages
    return ckpt


def restore(ckpt, **state):
    """The mirror of end_epoch(..., **state): every object (module, optimizer, GradScaler; None: skipped) loads its own
    entry of the checkpoint, a module after a clear error on differing keys or shapes (a --resume of another model).
    Returns the epoch to run next: 0 without a checkpoint."""
    if ckpt is None:
        return 0
    for name, obj in state.items():
        if obj is not None:
            if isinstance(obj, nn.Module):
                check_state_dict(ckpt[name], obj, ckpt["_source"])
            obj.load_state_dict(ckpt[name])
    return ckpt["epoch"]


def start_run(args, script):
    """After all checks: make output_dir, prove it writable, lock it, delete killed writes' temp files, print args,
    versions."""
    out = args.output_dir
    if is_main_process():
        try:
            os.makedirs(out, exist_ok=True)
            probe = os.path.join(out, f".write_test{os.getpid()}")
            open(probe, "w").close()
            os.remove(probe)
        except OSError as e:
            fail(f"--output_dir {out} is not writable ({type(e).__name__}: {e.strerror or e})")
        lock_output_dir(out)
        for f in os.listdir(out):
            if ".pth.tmp" in f:  # atomic_save's temp file of an interrupted write
                os.remove(os.path.join(out, f))
                print0(f"| removed {f}, left by an interrupted checkpoint write")
    print0("| " + "  ".join(f"{k}={v}" for k, v in sorted(vars(args).items())))
    print0(f"| {script} versions {versions()}")


def end_epoch(output_dir, script, args, epoch, train=None, test=None, save_every=0, **state):
    """After epoch `epoch`: a non-finite metric or parameter stops every rank before anything is written; else write
    checkpoint.pth: the state_dict() of every object in `state` (modules, optimizer, scaler; None: left out; plain
    values as they are), 'epoch' the next to run and 'args' a plain dict (weights_only loads it); 'model' is the
    student, 'teacher' a teacher that training changes (load_weights prefers it); restore(ckpt, **state) reads it
    back. Also checkpoint{epoch:04}.pth every save_every epochs, args.json, log.txt (each epoch once)."""
    state = {k: v.state_dict() if hasattr(v, "state_dict") else v for k, v in state.items() if v is not None}
    stats = {"epoch": epoch, **{f"train_{k}": v for k, v in (train or {}).items()},
             **{f"test_{k}": v for k, v in (test or {}).items()}}
    bad = [k for k, v in stats.items() if isinstance(v, float) and not math.isfinite(v)]
    bad += [f"{name}.{k}" for name, sd in state.items() if name not in ("optimizer", "scaler") and isinstance(sd, dict)
            for k, v in sd.items() if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        fail(f"non-finite values after epoch {epoch} ({', '.join(bad[:4])}); nothing saved, the last good checkpoint "
             "is untouched in output_dir; try a lower lr, --amp off or gradient clipping")
    ckpt = {"script": script, "args": vars(args), "epoch": epoch + 1, **state}
    error = None
    try:  # rank 0 writes; a failed write (full disk) stops every rank together, the previous files kept
        atomic_save(ckpt, os.path.join(output_dir, "checkpoint.pth"))
        if save_every and (epoch + 1) % save_every == 0:
            atomic_save(ckpt, os.path.join(output_dir, f"checkpoint{epoch + 1:04d}.pth"))
        if is_main_process():
            path = os.path.join(output_dir, "log.txt")
            lines = open(path).read().splitlines() if os.path.exists(path) else []
            lines = [l for l in lines if l.strip() and json.loads(l).get("epoch", -1) < epoch]  # a resumed epoch: once
            info = {"script": script, "args": vars(args), "versions": versions(),
                    "saved": datetime.datetime.now().isoformat(timespec="seconds")}
            for name, text in (("args.json", json.dumps(info, indent=1, default=str)),
                               ("log.txt", "".join(l + "\n" for l in lines + [json.dumps(stats)]))):
                try:
                    with open(os.path.join(output_dir, name + ".tmp"), "w") as f:
                        f.write(text)
                    os.replace(os.path.join(output_dir, name + ".tmp"), os.path.join(output_dir, name))
                except OSError as e:
                    with suppress(OSError):
                        os.remove(os.path.join(output_dir, name + ".tmp"))
                    fail(f"could not write {os.path.join(output_dir, name)} ({e.strerror or e}): the previous one is "
                         f"unchanged, checkpoint.pth holds epoch {epoch}; free some space and resume")
    except UserError as e:
        error = str(e)
    if is_dist():  # the other ranks learn rank 0's outcome: all stop together, none waits in the next collective
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        fail(error)


def versions():
    """torch / torchvision / timm / python versions, device and git state of this repository."""
    here = os.path.dirname(os.path.abspath(__file__))
    run = lambda *a: subprocess.check_output(["git", *a], cwd=here, stderr=subprocess.DEVNULL).strip()  # noqa: E731
    try:
        git = run("rev-parse", "--short", "HEAD").decode() + ("-dirty" if run("status", "--porcelain") else "")
    except Exception:
        git = "unknown"
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {"torch": torch.__version__, "torchvision": torchvision.__version__, "timm": timm.__version__,
            "python": sys.version.split()[0], "device": device, "git": git}


class Meter:
    """Running averages of the logged values for the periodic training line, the finite check, and the time spent
    on data (waiting on the loader, and the fast pipelines' device part). Tensor values are summed on their device:
    the host reads them (one all-reduce of the non-finite count over ranks, one copy) only at a printed line and at
    the epoch's end, so a step makes no host sync and the host can queue the next step while the device works on
    this one."""

    def __init__(self):
        self.sums, self.count, self.t0, self.wait = {}, 0, time.time(), 0.0
        self.keys, self.pending, self.since = [], None, 0  # the tensor values' names, device sums, first unread step
        self.on_device, self.device_from = None, 0.0  # the loader's device-part clock (OnDevice.seconds), its start

    def timed(self, loader):
        """The loader's batches; the time blocked on each, plus the time of the fast pipelines' device part (the
        loader's OnDevice, run by to_device: its own clock, read at the printed lines), is the line's "data" share."""
        self.on_device = getattr(getattr(loader, "on_device", None), "seconds", None)
        self.device_from = self.on_device() if self.on_device else 0.0
        batches = iter(loader)
        for _ in range(len(loader)):
            t = time.perf_counter()
            batch = next(batches)
            self.wait += time.perf_counter() - t
            yield batch

    def update(self, **values):
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)

    def log(self, epoch, it, steps, every, **values):
        """Add floats / 0-d tensors; every `every` iterations and at the last, read the device sums: a non-finite
        value on any rank (the loss first of all) stops every rank, naming the iterations since the last read, before
        anything is saved; then print the line."""
        keys = [k for k, v in values.items() if torch.is_tensor(v)]
        if keys:
            if keys != self.keys:  # another set of terms (rare): read the old sums first
                self.read(f"at epoch {epoch} iterations {self.since}-{it - 1}")
                self.keys = keys
            step = torch.stack([values[k].detach().float() for k in keys])
            self.pending = step.to(torch.float64 if step.device.type != "mps" else torch.float32) \
                if self.pending is None else self.pending + step
        self.update(**{k: v for k, v in values.items() if k not in keys})
        self.count += 1
        if it % every == 0 or it == steps - 1:
            self.read(f"at epoch {epoch} iterations {self.since}-{it}")
            self.since = it + 1
            print0(self.line(f"epoch {epoch}", it, steps))

    def read(self, where):
        """The device sums to the host, after the finite check over every rank (each reads at the same steps)."""
        if self.pending is None:
            return
        bad = all_reduce_sum((~torch.isfinite(self.pending)).any().to(self.pending.dtype).reshape(1))
        bad, *sums = torch.cat([bad, self.pending]).tolist()
        if bad > 0:
            fail(f"non-finite loss {where} on {int(bad)} rank(s); stopping all ranks. The last good checkpoint (if "
                 "any) is untouched in output_dir; try a lower lr, --amp off or gradient clipping")
        self.update(**dict(zip(self.keys, sums)))
        self.pending = None

    def averages(self):
        self.read("at the epoch's end")
        return {k: v / max(self.count, 1) for k, v in self.sums.items()}

    def line(self, prefix, step, total):
        elapsed = max(time.time() - self.t0, 1e-9)
        vals = "  ".join(f"{k} {v:.4g}" for k, v in self.averages().items())
        mem = f"  mem {torch.cuda.max_memory_allocated() / 2 ** 30:.1f}G" if torch.cuda.is_available() else ""
        device = self.on_device() - self.device_from if self.on_device else 0.0
        data = f"  data {100 * (self.wait + device) / elapsed:.0f}%"  # waiting on the loader + the device part
        return f"{prefix} [{step}/{total}]  {vals}  {self.count / elapsed:.2f} it/s{data}{mem}"


# ---- 7. frozen features: specs, linear-probe files, k-NN ------------------------------------
# Feature specs: {'n_last_blocks': n, 'avgpool': bool} (final-norm CLS of the last n blocks; with avgpool DINO's CLS +
# mean patch), {'layer': l} (CLS of block l) or {'pool': True} (the network's own pooled pre-logits: a global-pool
# ViT's fc_norm of the mean patch token, as MAE evaluates its finetunes).
def spec_name(spec):
    if spec.get("pool"):
        return "pool"
    if "layer" in spec:
        return f"block{spec['layer']}"
    if spec["n_last_blocks"] == 1:
        return "cls_avgpool" if spec["avgpool"] else "cls"
    return f"last{spec['n_last_blocks']}"


def feature_blocks(model, specs):
    """The blocks whose outputs the feature specs read."""
    depth = len(model.blocks)
    return sorted(set().union(*({s["layer"] % depth} if "layer" in s else {depth - 1} if s.get("pool") else
                                range(depth - s["n_last_blocks"], depth) for s in specs)))


def features_from_tokens(model, tokens, spec):
    """B x F feature of one spec from {block: B x N x D outputs after the final norm}."""
    depth, npt = len(model.blocks), model.num_prefix_tokens
    if spec.get("pool"):  # timm's pooling and fc_norm (a global-pool ViT's final norm is the identity)
        return model.forward_head(tokens[depth - 1], pre_logits=True)
    if "layer" in spec:
        return tokens[spec["layer"] % depth][:, 0]
    f = torch.cat([tokens[b][:, 0] for b in range(depth - spec["n_last_blocks"], depth)], -1)
    if spec["avgpool"]:  # DINO's layout: cls_0, avg_0, cls_1, avg_1, ...
        f = torch.stack([f, tokens[depth - 1][:, npt:].mean(1)], -1).flatten(1)
    return f


class LinearProbe(nn.Module):
    """Linear classifier on frozen features, optionally behind BatchNorm1d without affine (MAE); DINO's key names."""

    def __init__(self, dim, num_classes, bn=False):
        super().__init__()
        self.bn = nn.BatchNorm1d(dim, affine=False, eps=1e-6) if bn else nn.Identity()
        self.linear = nn.Linear(dim, num_classes)

    def forward(self, x):
        return self.linear(self.bn(x))


def save_probe(probe, spec, path, **info):
    """Probe file: state dict, feature spec, whether it has the BN head, and `info` (accuracy, lr, backbone weights)."""
    atomic_save({"probe": probe.state_dict(), "feature": spec, "bn": isinstance(probe.bn, nn.BatchNorm1d),
                 "num_classes": probe.linear.out_features, **info}, path)


def load_probe(path, embed_dim=None, trust=False):
    """(LinearProbe, feature spec) of a save_probe file or of DINO's *_linearweights.pth, whose feature (last 4 CLS for
    ViT-S, in = 4 D; CLS + mean patch for ViT-B, in = 2 D) is inferred from embed_dim."""
    ckpt = read_checkpoint(path, trust)
    if isinstance(ckpt, dict) and "probe" in ckpt and "feature" in ckpt:
        sd, spec, bn = ckpt["probe"], ckpt["feature"], ckpt.get("bn", False)
    else:
        sd, _ = pick_state_dict(ckpt, None, path)
        sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
        if set(sd) != {"linear.weight", "linear.bias"}:
            fail(f"{path} is neither a probe of eval_knn_linear.py nor a DINO linear classifier: {sorted(sd)[:6]}")
        if embed_dim is None:
            fail(f"{path} is a DINO linear classifier: its feature spec needs the backbone width")
        k, rest = divmod(sd["linear.weight"].shape[1], embed_dim)
        if rest:
            fail(f"{path}: input width {sd['linear.weight'].shape[1]} is not a multiple of {embed_dim}")
        spec, bn = (dict(n_last_blocks=1, avgpool=True) if k == 2 else dict(n_last_blocks=k, avgpool=False)), False
    probe = LinearProbe(sd["linear.weight"].shape[1], sd["linear.weight"].shape[0], bn=bn)
    probe.load_state_dict(sd)
    return probe.eval(), spec


@torch.no_grad()
def knn_classify(train_x, train_y, test_x, test_y, num_classes, ks=(10, 20, 100, 200), temperature=0.07,
                 device="cpu", max_entries=2 ** 26):
    """Weighted k-NN (DINO): {k: {'acc1', 'acc5'}} in %, similarities in chunks of <= max_entries (bounded memory)."""
    device = torch.device(device)
    bank, bank_y = F.normalize(train_x.to(device).float(), dim=1), train_y.to(device)
    test_x, test_y = F.normalize(test_x.float(), dim=1), test_y.to(device)
    kmax, chunk = min(max(ks), len(bank)), max(1, max_entries // max(1, len(bank)))
    hits = {k: torch.zeros(2, dtype=torch.long) for k in ks}
    for s in range(0, len(test_x), chunk):
        q = test_x[s:s + chunk].to(device)
        sim, idx = (q @ bank.T).topk(kmax, dim=1)
        w, neighbours = (sim / temperature).exp(), bank_y[idx]
        for k in ks:
            kk = min(k, kmax)
            votes = torch.zeros(len(q), num_classes, device=device).scatter_add_(1, neighbours[:, :kk], w[:, :kk])
            hit = votes.topk(min(5, num_classes), dim=1).indices.eq(test_y[s:s + chunk, None])
            hits[k] += torch.tensor([hit[:, 0].sum().item(), hit.any(1).sum().item()])
    n = len(test_x)
    return {k: {"acc1": 100.0 * h[0].item() / n, "acc5": 100.0 * h[1].item() / n} for k, h in hits.items()}


@torch.no_grad()
def knn_monitor(backbone, args, device):
    """{'knn_acc1': %} of DINO's k-NN (k 20, T 0.07) on backbone(x) (final-norm CLS), train vs val: extraction
    sharded, the bank and the k-NN on rank 0 (DINO's eval_knn), the same value returned on every rank."""
    t, was, feats = build_transform(args, False), backbone.training, {}
    backbone.eval()
    for split in ("train", "val"):
        x, y = [], []
        for images, target in progress(build_loader(build_dataset(args, split, t), args.batch_size, False,
                                                    args.num_workers), split):
            with autocast(device, args.amp):
                x.append(backbone(images.to(device, non_blocking=True)).float())
            y.append(target.to(device))
        feats[split] = gather_shards(torch.cat(x)), gather_shards(torch.cat(y))  # on rank 0 only
    backbone.train(was)
    (xtr, ytr), (xva, yva) = feats["train"], feats["val"]
    acc = torch.zeros(1, dtype=torch.float64, device=device)
    if is_main_process():  # the others wait for its result
        acc[0] = knn_classify(xtr, ytr, xva, yva, int(max(ytr.max(), yva.max())) + 1, (20,), 0.07, device)[20]["acc1"]
    if is_dist():
        dist.broadcast(acc, 0)
    return {"knn_acc1": acc.item()}
