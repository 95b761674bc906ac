"""One resumable command that reproduces the central claim of every paper of this repository at
small scale (CIFAR-10, 32 px, small ViTs), by running the repository's own scripts through their real
command lines: teachers first, then every paper's rows with its baseline on the same student, schedule
and seeds, then k-NN / linear-probe evaluation where the paper's metric needs it.

  # the quickstart: built-in synthetic shapes, no files needed, a few minutes on a 2-core CPU
  python bench/reproduce_cifar10.py --profile smoke --out output/reproduce
  # reduced protocol on real CIFAR-10 (hyperparameters are fixed on a validation split first)
  python bench/reproduce_cifar10.py --profile cpu --data cifar10-jpg.tar.gz --split val --out output/reproduce
  python bench/reproduce_cifar10.py --profile cpu --data cifar10-jpg.tar.gz --out output/reproduce \
      --results_dir bench/results   # the README's table (default: under --out)
  # one H100 / H200, 6 runs at a time on it, stopped cleanly after 330 s; --nproc N runs every script under torchrun
  python bench/reproduce_cifar10.py --profile gpu --data cifar10-jpg.tar.gz --jobs 6 --time_budget 330 --out output/reproduce
  # print the commands only, in execution order; one paper only (plus the teachers it needs)
  python bench/reproduce_cifar10.py --profile cpu --data DIR --dry_run --only vitkd

Re-running the same command continues: the plan is run in order and a run whose final artefact exists
is skipped; an interrupted one is started again with the same arguments and the script resumes from its
own checkpoint.pth. Order (with --jobs N, the first ready run of the plan starts first): teachers; each
paper's central row with its baseline (and evaluations) for the first seed; its other rows; then the
other seeds. --time_budget S starts nothing after S seconds, stops the runs still going (they resume
next time), writes the results of what finished and exits 0. A finished run made with other arguments
(a profile edited after it ran) is an error before any work: pick another --out or remove that run's
folder. After every finished run the results are rewritten: <results_dir>/cifar10_<profile>[_val].json
and .md (--results_dir: default --out, so a checkout is never modified). Each run keeps its metrics,
wall time and command in <run dir>/metrics.json; a run whose folder is gone (a wiped --out) keeps the result
the previous results file holds for it when that was made with the command planned now (marked carried).

Data discipline: with --split val the runs train on the training split minus a held-out validation
carve (val_per_class images per class, chosen by a fixed seed from sorted file names) and evaluate on
that carve: use it to fix a profile's hyperparameters. --split test (default) then trains on the same
training subset and evaluates on the 10,000 test images. A profile with teacher_data "all" trains its
teachers (and the SS stages, the SSL assistant and its probe) on every training image of the split, its
students on the per-class subset. Both are folders of symbolic links built once under OUT/data/.

Metrics: top-1 on the evaluation split for supervised students (the last test_acc1 of log.txt); k-NN@20
and the linear probe of eval_knn_linear.py for self-supervised ones; wall time measured around each run
and images/s = training images x epochs / wall time (an image, not its views). Standard library only
(torch for the in-process runner).
"""
import argparse
import contextlib
import json
import math
import os
import platform
import random
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import time
import traceback
from collections import namedtuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# =============================================================================================
# Profiles: every size, schedule and learning rate, as the scripts' own flags ({flag: value}; True: --flag,
# False: --no-flag, a list: its values, "": --flag=). "student" is the one ViT student of every paper.
# teacher_supervised is merged over supervised (the ViT teacher), ssl_teacher over ssl (the assistant).
# =============================================================================================
def vit(model, patch, depth, dim, heads):
    return dict(model=model, patch_size=patch, depth=depth, embed_dim=dim, num_heads=heads)


def supervised(**kw):  # the students' DeiT-style recipe with the light augmentation of 32 px images
    return {**dict(epochs=6, batch_size=64, blr=4e-3, warmup_epochs=1, min_lr=1e-5, weight_decay=0.05, clip_grad=0,
                   drop_path=0.1, smoothing=0.1, randaug="", reprob=0, mixup=0, cutmix=0, eval_every=1000), **kw}


SSL_HEADS = dict(framework="simclr", proj_hidden=512, mid_proj_hidden=256, pred_hidden=512, out_dim=128)
PROFILES = {
    # the regression test's size (test_smoke.py's reproduction test): every code path, no learning expected;
    # 3 supervised epochs so that SSTA's early stop (a third of them) is not empty
    "tiny": dict(
        data=dict(synthetic_size=64), seeds=1, num_workers=0, jobs=1, threads=1, runner="inprocess",
        student=vit("deit_tiny", 16, 2, 24, 3), teacher=vit("deit_tiny", 16, 2, 24, 3), cnn="resnet10t",
        supervised=supervised(epochs=3, batch_size=32, blr=1e-2, warmup_epochs=0, drop_path=0),
        teacher_supervised=dict(epochs=1),
        cnn_teacher=dict(epochs=1, batch_size=32, decay_epochs=[], eval_every=1000),
        teacher_ss=dict(ss_epochs=1, ss_decay_epochs=[], batch_size=16),
        ssta=dict(distill_layers=[-2, -1], selection_images=32),
        sskd=dict(epochs=1, batch_size=16, blr=0.2, decay_epochs=[], eval_every=1000),
        attn=dict(epochs=1, batch_size=32, blr=1e-2, warmup_epochs=0),
        ssl=dict(SSL_HEADS, epochs=1, batch_size=32, blr=1e-2, warmup_epochs=0, proj_hidden=32, mid_proj_hidden=32,
                 pred_hidden=32, out_dim=16),
        ssl_teacher=dict(epochs=1),
        eval=dict(batch_size=64, nb_knn=20, probe_epochs=2, probe_lrs=[0.1, 1.0]),
    ),
    # the README quickstart: synthetic shapes (1000 images, 6 student epochs: less does not learn), 27 runs of
    # 5 to 15 s each on 2 CPU cores
    "smoke": dict(
        data=dict(synthetic_size=1000), seeds=1, num_workers=0, jobs=1, threads=1, runner="inprocess",
        student=vit("deit_tiny", 8, 2, 48, 3), teacher=vit("deit_tiny", 8, 2, 192, 3), cnn="resnet10t",
        supervised=supervised(batch_size=32, blr=1e-2, drop_path=0),
        teacher_supervised=dict(epochs=10),
        cnn_teacher=dict(epochs=6, batch_size=32, blr=0.2, decay_epochs=[5], eval_every=1000),
        teacher_ss=dict(ss_epochs=3, ss_decay_epochs=[2], batch_size=32),
        ssta=dict(distill_layers=[-2, -1], selection_images=500),
        sskd=dict(epochs=6, batch_size=32, blr=0.05, decay_epochs=[5], eval_every=1000),
        attn=dict(epochs=6, batch_size=32, blr=1e-2, warmup_epochs=1),
        ssl=dict(SSL_HEADS, epochs=6, batch_size=32, blr=1e-2, warmup_epochs=1, crop_min_scale=0.4,
                 color_jitter=[0.8, 0.8, 0.8, 0.5], proj_hidden=256, mid_proj_hidden=128, pred_hidden=256, out_dim=64),
        ssl_teacher=dict(epochs=8),
        eval=dict(batch_size=256, nb_knn=20, probe_epochs=30),
    ),
    # reduced protocol on real CIFAR-10 for 2 shared CPU cores, chosen on --split val (seed 0). One thread: this
    # student trains at 600-700 img/s. 500 images per class x 8 epochs gave a teacher too close to the student
    # alone (38.9 vs 36.8), hence 1000 x 6 (carve: alone 39.2%, KD 41.6, NKD 41.7, ViTKD 40.1, ViTKD + NKD 40.5).
    # Teachers on all images (teacher_data "all"; bench/results/cifar10_cpu_teacher_search.md): the ViT teacher at
    # the supervised recipe for 12 epochs reaches 51.4% on the carve (+12.2 over the student alone); the SimCLR
    # assistant for 10 epochs k-NN@20 51.8 with the students' 10,000-image bank (6 epochs: 48.5). The CNN teacher
    # and the SS stages keep their epochs on 5x the images. Measured (2026-12-06, test split): the teachers about
    # 2 h 15 min of wall-clock time on shared cores, each seed's 22 student runs 33-35 min on 2 idle cores.
    "cpu": dict(
        data=dict(train_per_class=1000, val_per_class=500), teacher_data="all", seeds=3, num_workers=2, jobs=2,
        threads=1,
        student=vit("deit_tiny", 8, 4, 96, 3), teacher=vit("deit_tiny", 8, 4, 192, 3), cnn="resnet10t",
        supervised=supervised(),
        teacher_supervised=dict(epochs=12),
        cnn_teacher=dict(epochs=10, batch_size=64, blr=0.2, decay_epochs=[7, 9], eval_every=1000),
        teacher_ss=dict(ss_epochs=2, ss_decay_epochs=[1], batch_size=64),
        ssta=dict(distill_layers=[-2, -1], selection_images=1000),
        sskd=dict(epochs=6, batch_size=64, blr=0.05, decay_epochs=[4, 5], eval_every=1000),
        attn=dict(epochs=6, batch_size=64, blr=4e-3, warmup_epochs=1),
        ssl=dict(SSL_HEADS, epochs=6, batch_size=128, blr=4e-3, warmup_epochs=1, crop_min_scale=0.2),
        ssl_teacher=dict(epochs=10),
        eval=dict(batch_size=256, nb_knn=20, probe_epochs=50, probe_holdout=0.1),
    ),
    # one H200 (16 CPU cores) in about 5-11 minutes, 6 runs sharing the GPU. Teachers on all 50,000 training images,
    # students on 500 per class (design target: the ViT teacher >= 10 points above the student alone).
    # MEASURED on one H200 (2026-11-30, 315 s budget; bench/results/gpu_2026-11-30): 26 of 72 runs finished, the
    # teachers in 272 s; the loaders waited 31-78% of each run (seconds per run: teacher_ssl 232, teacher_vit 175,
    # teacher_cnn 180, SS stages 53-57, supervised students 40-51, SSKD 55-61, AttnDistill 34-35, SDSSL 80-82,
    # evaluations 16-26): the whole plan needs about 11 minutes. Two recipe failures, fixed here but NOT yet re-run
    # on a GPU: the ViT teacher at lr 2e-3 with 1 warm-up epoch stalled (30.0%, below the student alone's 37.2):
    # now lr 1e-3 and 3 warm-up epochs; SSKD at blr 0.2 went non-finite at iteration 12: now 0.05 (the cpu one's).
    "gpu": dict(
        data=dict(train_per_class=500, val_per_class=500), teacher_data="all", seeds=3, num_workers=2,
        teacher_workers=4, jobs=6, threads=1,
        student=vit("deit_tiny", 4, 6, 192, 3), teacher=vit("deit_small", 4, 6, 384, 6), cnn="resnet18",
        supervised=supervised(epochs=12, batch_size=128, blr=2e-3, randaug="rand-m9-mstd0.5-inc1"),
        teacher_supervised=dict(epochs=15, batch_size=256, blr=1e-3, warmup_epochs=3),
        cnn_teacher=dict(epochs=10, batch_size=256, blr=0.2, decay_epochs=[6, 8], eval_every=1000),
        teacher_ss=dict(ss_epochs=2, ss_decay_epochs=[1], batch_size=256),
        ssta=dict(distill_layers=[-3, -2, -1], selection_images=2000),
        sskd=dict(epochs=12, batch_size=128, blr=0.05, decay_epochs=[7, 10], eval_every=1000),
        attn=dict(epochs=12, batch_size=128, blr=2e-3, warmup_epochs=1),
        ssl=dict(SSL_HEADS, framework="mocov3", epochs=12, batch_size=256, blr=2e-3, warmup_epochs=1,
                 crop_min_scale=0.2, proj_hidden=1024, mid_proj_hidden=512, pred_hidden=1024, out_dim=256),
        ssl_teacher=dict(epochs=8),
        eval=dict(batch_size=512, nb_knn=20, probe_epochs=100, probe_holdout=0.1),
    ),
}
# five times the cpu profile's student epochs (warm-up scaled with them, every other setting unchanged, nothing tuned
# on the test split) for the rows of the three claims the 6-epoch table attributed to scale (#32): ViTKD + NKD against
# alone / NKD / ViTKD, SSTA's early stop against none (it stops at a third of the epochs, as at 6), SDSSL against
# its plain framework. teachers_from: the teachers are the cpu profile's runs (same commands, same folder
# OUT/cpu_<split>), trained once for both; keys: the only student runs planned. Estimated from the cpu profile's
# measured run times x5: about 2.7 h per seed on one core (8 h for 3 seeds, plus the teachers' 4.4 h when they are
# not there yet).
PROFILES["cpu_long"] = dict(
    PROFILES["cpu"], teachers_from="cpu",
    keys=("vitkd_alone", "vitkd_nkd", "vitkd_vitkd", "vitkd_vitkd_nkd", "ssta_ssta", "ssta_noes", "sdssl_plain",
          "sdssl_plain_eval", "sdssl_sd", "sdssl_sd_eval"),
    supervised={**PROFILES["cpu"]["supervised"], "epochs": 30, "warmup_epochs": 5},
    ssl={**PROFILES["cpu"]["ssl"], "epochs": 30, "warmup_epochs": 5})
# The CNN teacher's two failed rows taken apart on the validation carve (#32; `--split val`: every choice is made
# there; with `--split test` only the chosen token teacher's row is run, beside the cpu table's). SSKD from the
# ResNet: from the same SS-stage checkpoint KD alone, KD + L_T, KD + L_ss and SSKD, and SSKD after an SS stage three
# times as long (ss_epochs 6, decay at 4; the cpu stage: 2, decay at 1). DeiT's token: the ResNet trained by vitkd.py
# on the students' own augmentation (DeiT's random-resized crops and flips at 32 px, label smoothing, AdamW at the
# students' lr; the old teacher saw sskd.py's padded crops), 10 epochs like the old teacher, its token row beside the
# old teacher's. Teachers from the cpu profile's folder (OUT/cpu_val).
PROFILES["cpu_cnn"] = dict(
    PROFILES["cpu"], teachers_from="cpu",
    cnn_probe=dict(ss_long=dict(ss_epochs=6, ss_decay_epochs=[4]), crop_teacher=dict(epochs=10)),
    keys=("sskd_alone", "sskd_kd_cnn", "sskd_tf_cnn", "sskd_ss_cnn", "sskd_sskd_cnn", "sskd_sskd_cnn_long",
          "vitkd_alone", "vitkd_token", "vitkd_token_crops"))
# teacher_workers: the teachers' --num_workers (default num_workers). threads: OMP_NUM_THREADS of every run (on a
# shared 2-core CPU one thread is up to 5x faster than two: OpenMP threads spin against the other run's).

# vitkd.py's KD row: the official ViTKD code's classic KD (0.5 CE + 0.5 KD, T 1)
VITKD_KD = dict(alpha_vitkd=0, beta_vitkd=0, kd_weight=0.5, ce_weight=0.5)
SPLIT_SEED = 0  # the fixed seed of the validation carve and of the training subset

# =============================================================================================
# Claims: one row per table line. key: the run (without its seed) the row reads; baselines: the runs
# whose rows (same metric) the method's mean over seeds must beat, all of them; none = a reference row.
# =============================================================================================
Row = namedtuple("Row", "paper key method metric baselines claim")
ROWS = [
    Row("vitkd", "vitkd_alone", "student alone", "top1", (), "reference (Table 5: DeiT-Ti alone 74.42)"),
    Row("vitkd", "vitkd_kd", "KD", "top1", ("vitkd_alone",), "logit KD beats the student alone (75.01 vs 74.42)"),
    Row("vitkd", "vitkd_nkd", "NKD", "top1", ("vitkd_kd",), "NKD beats classic KD (75.48 vs 75.01)"),
    Row("vitkd", "vitkd_vitkd", "ViTKD", "top1", ("vitkd_alone",),
        "ViTKD's feature distillation beats the student alone (75.40 vs 74.42)"),
    Row("vitkd", "vitkd_vitkd_nkd", "ViTKD + NKD", "top1", ("vitkd_alone", "vitkd_nkd", "vitkd_vitkd"),
        "ViTKD + NKD is the best row: above alone, NKD and ViTKD (76.18 vs 74.42 / 75.48 / 75.40)"),
    Row("vitkd", "vitkd_token", "DeiT token (CNN teacher)", "top1", ("vitkd_alone",),
        "DeiT: hard distillation through a distillation token from a CNN teacher beats the student alone (74.5 vs 72.2)"),
    Row("vitkd", "vitkd_token_crops", "DeiT token (CNN teacher trained on the students' crops)", "top1",
        ("vitkd_alone", "vitkd_token"), "a CNN teacher that saw the students' crops gives a better token (#32)"),
    Row("ssta", "vitkd_alone", "student alone (the vitkd run)", "top1", (), "reference (Table 3: DeiT-Ti 72.2)"),
    Row("ssta", "ssta_sl", "SL teacher only", "top1", ("vitkd_alone",),
        "head-level KD from the supervised teacher helps (73.2 vs 72.2)"),
    Row("ssta", "ssta_ta", "SSL assistant only", "top1", ("vitkd_alone",),
        "head-level KD from the self-supervised assistant helps (72.6 vs 72.2)"),
    Row("ssta", "ssta_ssta", "SSTA (both, early stop)", "top1", ("ssta_sl", "ssta_ta"),
        "both teachers beat either one alone (74.0 vs 73.2 / 72.6)"),
    Row("ssta", "ssta_noes", "SSTA without early stop", "top1", (),
        "reference for the early stop (72.2: no gain without it)"),
    Row("ssta", "ssta_ssta", "SSTA vs no early stop", "top1", ("ssta_noes",),
        "stopping the distillation after a third of training helps (74.0 vs 72.2)"),
    Row("sskd", "sskd_alone", "student alone", "top1", (), "reference"),
    Row("sskd", "sskd_kd", "KD (ViT teacher)", "top1", ("sskd_alone",), "KD beats the student alone"),
    Row("sskd", "sskd_sskd", "SSKD (ViT teacher)", "top1", ("sskd_kd",),
        "SSKD beats KD with the same teacher (vgg13 -> vgg8: 75.33 vs 72.98)"),
    Row("sskd", "sskd_sskd_cnn", "SSKD (CNN teacher)", "top1", ("sskd_alone",),
        "SSKD transfers across architectures: a CNN teacher helps the ViT student"),
    Row("sskd", "sskd_kd_cnn", "KD (CNN teacher)", "top1", ("sskd_alone",),
        "KD from the CNN teacher alone (the SSKD row without its SS terms) beats the student alone (#32)"),
    Row("sskd", "sskd_tf_cnn", "KD + L_T (CNN teacher)", "top1", ("sskd_kd_cnn",),
        "L_T (KD on the rotated views) adds to KD from the CNN teacher (#32)"),
    Row("sskd", "sskd_ss_cnn", "KD + L_ss (CNN teacher)", "top1", ("sskd_kd_cnn",),
        "L_ss (the SS similarity loss) adds to KD from the CNN teacher (#32)"),
    Row("sskd", "sskd_sskd_cnn_long", "SSKD (CNN teacher, 3x SS stage)", "top1", ("sskd_sskd_cnn",),
        "a stronger SS stage makes SSKD from the CNN teacher better (#32)"),
    Row("attn_distill", "attn_pa_eval", "PA only", "knn20", (), "reference (ImageNet-Subset, ViT-T: 77.8)"),
    Row("attn_distill", "attn_ad_eval", "AttnDistill", "knn20", ("attn_pa_eval",),
        "attention distillation beats PA only (k-NN 79.3 vs 77.8)"),
    Row("attn_distill", "attn_pa_eval", "PA only", "linear", (), "reference"),
    Row("attn_distill", "attn_ad_eval", "AttnDistill", "linear", ("attn_pa_eval",),
        "attention distillation beats PA only (linear probe)"),
    Row("sdssl", "sdssl_plain_eval", "plain framework", "knn20", (), "reference (MoCo v3 ViT-S/16: 66.5)"),
    Row("sdssl", "sdssl_sd_eval", "self-distilled (SD)", "knn20", ("sdssl_plain_eval",),
        "SD beats the plain framework at the last layer (k-NN 68.0 vs 66.5)"),
    Row("sdssl", "sdssl_plain_eval", "plain framework", "linear", (), "reference (MoCo v3 ViT-S/16: 70.0)"),
    Row("sdssl", "sdssl_sd_eval", "self-distilled (SD)", "linear", ("sdssl_plain_eval",),
        "SD beats the plain framework (linear 71.5 vs 70.0)"),
    Row("sdssl", "sdssl_gain_last", "SD - plain, last block", "gain", (), "reference: the final layer's k-NN gain"),
    Row("sdssl", "sdssl_gain_mid", "SD - plain, intermediate blocks (mean)", "gain", ("sdssl_gain_last",),
        "SD's k-NN gain is larger at the intermediate blocks than at the last one (Fig. 3)"),
]
METRIC_NAMES = {"top1": "top-1 %", "knn20": "k-NN@20 %", "linear": "linear probe %", "gain": "k-NN@20 gain, points",
                "ss_acc1": "SS contrastive prediction %"}
PAPERS = {"vitkd": "ViTKD + NKD (ViTKD Table 5)", "ssta": "SSTA: self-supervised teaching assistant (Tables 3-4)",
          "sskd": "SSKD: KD meets self-supervision", "attn_distill": "AttnDistill (no labels)",
          "sdssl": "SDSSL: self-distilled self-supervised learning"}
# the runs of each paper's central claim (with their baselines and evaluations): started before the other rows
CENTRAL = {"vitkd_alone", "vitkd_vitkd_nkd", "ssta_ssta", "sskd_sskd", "sskd_kd", "sskd_alone", "attn_ad", "attn_pa",
           "attn_ad_eval", "attn_pa_eval", "sdssl_sd", "sdssl_plain", "sdssl_sd_eval", "sdssl_plain_eval"}


# =============================================================================================
# Data: the CIFAR-10 tarball or folder -> symlinked ImageFolder roots per split
# =============================================================================================
def find_root(path):
    """The folder under `path` (itself or up to two levels down) that holds train/."""
    for cand in [path] + [os.path.join(path, d) for d in sorted(os.listdir(path))] + \
            [os.path.join(path, d, e) for d in sorted(os.listdir(path)) if os.path.isdir(os.path.join(path, d))
             for e in sorted(os.listdir(os.path.join(path, d)))]:
        if os.path.isdir(os.path.join(cand, "train")):
            return cand
    sys.exit(f"error: no train/ folder under {path}")


def source_root(data, out):
    """An unpacked CIFAR-10 root (train/<class>/, test/<class>/): --data itself, or the tarball unpacked once
    into OUT/data/src."""
    data = os.path.abspath(os.path.expanduser(data))
    if os.path.isdir(data):
        return find_root(data)
    if not os.path.isfile(data):
        sys.exit(f"error: --data {data} not found (a CIFAR-10 tarball or an unpacked folder)")
    dst = os.path.join(out, "data", "src")
    if not os.path.exists(os.path.join(dst, ".complete")):
        print(f"| unpacking {data} into {dst} (once)", flush=True)
        shutil.rmtree(dst, ignore_errors=True)
        os.makedirs(dst)
        with tarfile.open(data) as tar:
            tar.extractall(dst, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
        open(os.path.join(dst, ".complete"), "w").close()
    return find_root(dst)


def split_root(src, out, split, train_per_class, val_per_class, dry_run=False):
    """A symlinked ImageFolder root for this split, built once. Per class, the sorted training file names are
    shuffled with a fixed seed; the first val_per_class form the validation carve, the rest is the pool. --split
    val: train/ = the pool (or its first train_per_class), val/ = the carve. --split test: train/ = the same subset
    (or every training image when train_per_class is None), test/ = the test split. Returns (root, training
    images, evaluation images)."""
    root = os.path.join(out, "data", f"cifar10_{split}_tr{train_per_class or 'all'}_v{val_per_class}")
    manifest = os.path.join(root, "split.json")
    if os.path.exists(manifest):
        m = load_json(manifest)
        return root, m["train_images"], m["eval_images"]
    if dry_run:
        return root, 0, 0
    test_dir = next((os.path.join(src, d) for d in ("test", "val") if os.path.isdir(os.path.join(src, d))), None)
    if test_dir is None:
        sys.exit(f"error: {src} has no test/ or val/ folder")
    shutil.rmtree(root, ignore_errors=True)
    counts = {"train": 0, "eval": 0}

    def link(files, from_dir, to_dir, key):
        os.makedirs(to_dir, exist_ok=True)
        for name in sorted(files):
            os.symlink(os.path.join(from_dir, name), os.path.join(to_dir, name))
        counts[key] += len(files)

    for cls in sorted(os.listdir(os.path.join(src, "train"))):
        cdir = os.path.join(src, "train", cls)
        files = sorted(os.listdir(cdir))
        order = list(files)
        random.Random(f"{SPLIT_SEED}:{cls}").shuffle(order)
        carve, pool = order[:val_per_class], order[val_per_class:]
        if train_per_class and train_per_class > len(pool):
            sys.exit(f"error: class {cls} has {len(pool)} images after the validation carve, fewer than "
                     f"train_per_class {train_per_class}")
        subset = pool[:train_per_class] if train_per_class else pool if split == "val" else files
        link(subset, cdir, os.path.join(root, "train", cls), "train")
        if split == "val":
            link(carve, cdir, os.path.join(root, "val", cls), "eval")
        else:
            tdir = os.path.join(test_dir, cls)
            link(os.listdir(tdir), tdir, os.path.join(root, "test", cls), "eval")
    write_json(manifest, {"source": src, "split": split, "train_per_class": train_per_class,
                          "val_per_class": val_per_class, "seed": SPLIT_SEED, "train_images": counts["train"],
                          "eval_images": counts["eval"]})
    print(f"| {split} split under {root}: {counts['train']} training, {counts['eval']} evaluation images", flush=True)
    return root, counts["train"], counts["eval"]


# =============================================================================================
# The plan: every run, its command, what it needs, and how to tell that it has finished
# =============================================================================================
def flags(recipe):
    """{flag: value} -> the command-line tokens (True: --flag, False: --no-flag, a list: its values, "": --flag=)."""
    out = []
    for k, v in recipe.items():
        if v is True or v is False:
            out.append(f"--{k}" if v else f"--no-{k}")
        elif isinstance(v, (list, tuple)):
            out += [f"--{k}", *map(str, v)]
        else:
            out += [f"--{k}=" if v == "" else f"--{k}", *([] if v == "" else [str(v)])]
    return out


class Run:
    """One invocation of a script. kind: sup (supervised, top-1 in log.txt), ss (sskd.py's teacher stage 2),
    ssl (self-supervised training), eval (eval_knn_linear.py). seed None: a teacher (trained once)."""

    def __init__(self, key, seed, script, recipe, kind, deps, workdir, images):
        self.key, self.seed, self.script, self.kind, self.deps = key, seed, script, kind, list(deps)
        self.name = key if seed is None else f"{key}_s{seed}"
        self.dir = os.path.join(workdir, self.name)
        self.args = flags({**recipe, "output_dir": self.dir})
        self.epochs = 1 if kind == "eval" else recipe["ss_epochs" if kind == "ss" else "epochs"]
        self.train_images, self.eval_images = images

    def artefact(self):
        return os.path.join(self.dir, {"eval": "eval_results.json", "ss": "checkpoint.pth"}.get(self.kind,
                                                                                              "student_backbone.pth"))

    def finished(self):
        if not os.path.exists(self.artefact()):
            return False
        if self.kind == "ss":  # stage 2 writes only checkpoint.pth: finished when its last epoch is logged
            lines = read_log(self.dir)
            return bool(lines) and lines[-1].get("epoch", -1) + 1 >= self.epochs
        return True

    def images_seen(self):
        return self.train_images + self.eval_images if self.kind == "eval" else self.train_images * self.epochs

    def command(self, nproc):
        launcher = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                                       if nproc > 1 else [])
        return launcher + [self.script] + self.args


def build_plan(P, workdir, data, images, seeds, teacher_data=None, teacher_workdir=None):
    """Every run of the profile in execution order: the teachers (on teacher_data = ({data flags}, images) when
    they train on more images than the students), then seed by seed the central rows before the others. A profile
    with teachers_from takes its teachers' recipes from that profile and their folders from teacher_workdir (one
    teacher serves both tables); with keys, only those student runs (and the teachers they need) are planned."""
    runs = []
    t_data, t_images = teacher_data or (data, images)
    TP = PROFILES[P["teachers_from"]] if P.get("teachers_from") else P  # the teachers' profile
    twork = teacher_workdir or workdir

    def add(key, script, recipe, kind, deps=(), seed=None, on_teacher_data=None):
        teacher = seed is None if on_teacher_data is None else on_teacher_data
        workers = P.get("teacher_workers", P["num_workers"]) if teacher else P["num_workers"]
        seed_flag = {} if kind == "eval" else {"seed": seed or 0}  # evaluations keep eval_knn_linear.py's seed
        recipe = {**recipe, **seed_flag, **(t_data if teacher else data), "num_workers": workers}
        runs.append(Run(key, seed, script, recipe, kind, deps, workdir if seed is not None else twork,
                        t_images if teacher else images))

    def path(name, f):  # a run's file: the teachers' (no seed in the name) under their own folder
        return os.path.join(workdir if name.rsplit("_s", 1)[-1].isdigit() else twork, name, f)

    def arch(a, flag="student"):
        return {flag: a["model"], **{k: v for k, v in a.items() if k != "model"}}

    ssl_teacher = {**TP["ssl"], **TP["ssl_teacher"], "alpha_max": 0, "pred_loss": False}
    assistant = path("teacher_ssl", "student_backbone.pth")
    # ---------------- teachers; the SSL assistant first: most runs wait on it and its probe ----------------
    add("teacher_ssl", "sdssl.py", {**arch(TP["teacher"], "arch"), **ssl_teacher}, "ssl")
    add("teacher_ssl_probe", "eval_knn_linear.py", {"weights": assistant, **TP["eval"]}, "eval", ["teacher_ssl"])
    if teacher_data:  # the assistant's k-NN with the students' bank and evaluation images: comparable with theirs
        add("teacher_ssl_knn", "eval_knn_linear.py", {"weights": assistant, **TP["eval"], "linear": False}, "eval",
            ["teacher_ssl"], on_teacher_data=False)
    add("teacher_vit", "vitkd.py", {**arch(TP["teacher"]), **TP["supervised"], **TP["teacher_supervised"]}, "sup")
    add("teacher_vit_ss", "sskd.py", {"stage": "teacher_ss", "teacher_weights": path("teacher_vit", "checkpoint.pth"),
                                      **TP["teacher_ss"]}, "ss", ["teacher_vit"])
    add("teacher_cnn", "sskd.py", {"student": TP["cnn"], **TP["cnn_teacher"]}, "sup")
    add("teacher_cnn_ss", "sskd.py", {"stage": "teacher_ss", "teacher_weights": path("teacher_cnn", "checkpoint.pth"),
                                      **TP["teacher_ss"]}, "ss", ["teacher_cnn"])
    probe = P.get("cnn_probe")  # profile cpu_cnn: a longer SS stage and a teacher trained on the students' crops
    if probe:
        add("teacher_cnn_ss_long", "sskd.py", {"stage": "teacher_ss", "teacher_weights": path("teacher_cnn", "checkpoint.pth"),
                                               **TP["teacher_ss"], **probe["ss_long"]}, "ss", ["teacher_cnn"])
        add("teacher_cnn_crops", "vitkd.py", {"student": TP["cnn"], **TP["supervised"], **probe["crop_teacher"]}, "sup")
    T = {"teacher_weights": path("teacher_vit", "checkpoint.pth")}
    TA = {"ta_weights": assistant, "ta_probe": path("teacher_ssl_probe", "linear_probe.pth")}
    student, sup = arch(P["student"]), {**arch(P["student"]), **P["supervised"]}
    # ---------------- students, seed by seed ----------------
    for s in seeds:
        def student_run(key, script, recipe, kind="sup", deps=()):
            add(key, script, recipe, kind, deps, seed=s)

        def evaluation(key, **extra):  # k-NN and linear probe of a self-supervised student's backbone
            add(f"{key}_eval", "eval_knn_linear.py", {"weights": path(f"{key}_s{s}", "student_backbone.pth"),
                                                       **P["eval"], **extra}, "eval", [f"{key}_s{s}"], seed=s)
        # vitkd.py: the student alone is also SSTA's baseline (same recipe, --drop_path included)
        student_run("vitkd_alone", "vitkd.py", sup)
        student_run("vitkd_kd", "vitkd.py", {**sup, **T, **VITKD_KD}, deps=["teacher_vit"])
        student_run("vitkd_nkd", "vitkd.py", {**sup, **T, "alpha_vitkd": 0, "beta_vitkd": 0, "nkd": True},
                    deps=["teacher_vit"])
        student_run("vitkd_vitkd", "vitkd.py", {**sup, **T, "vitkd_rescale": True}, deps=["teacher_vit"])
        student_run("vitkd_vitkd_nkd", "vitkd.py", {**sup, **T, "vitkd_rescale": True, "nkd": True}, deps=["teacher_vit"])
        # DeiT's distillation token: the same student with a distillation token, hard-distilled from the CNN teacher
        # (cpu_cnn: also from the CNN teacher trained on the students' crops)
        for key, cnn in (("vitkd_token", "teacher_cnn"),) + ((("vitkd_token_crops", "teacher_cnn_crops"),) if probe else ()):
            student_run(key, "vitkd.py", {**sup, "student": P["student"]["model"] + "_distilled_patch16_224",
                                          "teacher_weights": path(cnn, "checkpoint.pth"), "distill_token": "hard",
                                          "alpha_vitkd": 0, "beta_vitkd": 0}, deps=[cnn])
        # ssta.py: the same recipe (DeiT's repeated augmentation off, as in vitkd_alone); teacher, assistant, both,
        # both without the early stop
        ssta = {**sup, "repeated_aug": False, **P["ssta"]}
        student_run("ssta_sl", "ssta.py", {**ssta, **T}, deps=["teacher_vit"])
        student_run("ssta_ta", "ssta.py", {**ssta, **TA}, deps=["teacher_ssl_probe"])
        student_run("ssta_ssta", "ssta.py", {**ssta, **T, **TA}, deps=["teacher_vit", "teacher_ssl_probe"])
        student_run("ssta_noes", "ssta.py", {**ssta, **T, **TA, "early_stop_epoch": sup["epochs"]},
                    deps=["teacher_vit", "teacher_ssl_probe"])
        # sskd.py: its own recipe (SGD, step decay); KD and SSKD read the teachers' stage-2 checkpoints
        sskd = {**student, **P["sskd"]}
        TS = {"teacher_weights": path("teacher_vit_ss", "checkpoint.pth")}
        student_run("sskd_alone", "sskd.py", sskd)
        student_run("sskd_kd", "sskd.py", {**sskd, **TS, "tf_weight": 0, "ss_weight": 0}, deps=["teacher_vit_ss"])
        student_run("sskd_sskd", "sskd.py", {**sskd, **TS}, deps=["teacher_vit_ss"])
        student_run("sskd_sskd_cnn", "sskd.py", {**sskd, "teacher_weights": path("teacher_cnn_ss", "checkpoint.pth")},
                    deps=["teacher_cnn_ss"])
        if probe:  # from the CNN teacher: KD alone, KD + L_T, KD + L_ss; SSKD after the longer SS stage
            for key, off in (("sskd_kd_cnn", {"tf_weight": 0, "ss_weight": 0}), ("sskd_tf_cnn", {"ss_weight": 0}),
                             ("sskd_ss_cnn", {"tf_weight": 0})):
                student_run(key, "sskd.py", {**sskd, "teacher_weights": path("teacher_cnn_ss", "checkpoint.pth"), **off},
                            deps=["teacher_cnn_ss"])
            student_run("sskd_sskd_cnn_long", "sskd.py", {**sskd, "teacher_weights": path("teacher_cnn_ss_long",
                                                                                          "checkpoint.pth")},
                        deps=["teacher_cnn_ss_long"])
        # attn_distill.py (no labels): PA only vs AttnDistill, from the self-supervised teacher
        for key, extra in (("attn_pa", {"lambda_attn": 0}), ("attn_ad", {})):
            student_run(key, "attn_distill.py", {**student, **P["attn"], "teacher_weights": assistant, **extra}, "ssl",
                        ["teacher_ssl"])
            evaluation(key)
        # sdssl.py: the plain framework vs self-distilled; every block's CLS evaluated
        for key, extra in (("sdssl_plain", {"alpha_max": 0, "pred_loss": False}), ("sdssl_sd", {})):
            student_run(key, "sdssl.py", {**arch(P["student"], "arch"), **P["ssl"], **extra}, "ssl")
            evaluation(key, layers=list(range(P["student"]["depth"])))
    if P.get("keys"):
        runs = restrict(runs, keys=set(P["keys"]))
    order = {r.name: i for i, r in enumerate(runs)}
    return sorted(runs, key=lambda r: (r.seed is not None, r.seed or 0, r.key not in CENTRAL, order[r.name]))


def restrict(runs, papers=(), keys=(), names=()):
    """The runs that the rows of `papers` read (or the runs of `keys`, or those named), and everything they depend on."""
    keys = set(keys) | {r.key for r in ROWS if r.paper in papers} | (
        {"sdssl_plain_eval", "sdssl_sd_eval"} if "sdssl" in papers else set())
    by_name = {r.name: r for r in runs}
    want = {r.name for r in runs if r.key in keys or r.name in names}
    stack = list(want)
    while stack:
        for d in by_name[stack.pop()].deps:
            if d not in want:
                want.add(d)
                stack.append(d)
    return [r for r in runs if r.name in want]


# =============================================================================================
# Files: metrics of one run from what the scripts write
# =============================================================================================
def load_json(path, default=None):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return default


def write_json(path, obj):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def read_log(d):
    lines = []
    with contextlib.suppress(OSError), open(os.path.join(d, "log.txt")) as f:
        for line in f:
            with contextlib.suppress(ValueError):
                lines.append(json.loads(line))
    return lines


def run_metrics(run):
    """{metric: value} of a finished run: top1 / top5 (sup), ss_acc1 (ss), knn20 / linear and the per-block
    k-NN@20 list of a multi-exit evaluation (eval)."""
    if run.kind == "eval":
        res = load_json(run.artefact(), {})
        knn, linear = res.get("knn", {}), res.get("linear", {})
        m = {}
        if "20" in knn.get("cls", {}):
            m["knn20"] = knn["cls"]["20"]["acc1"]
        if "cls" in linear:
            m["linear"] = linear["cls"]["acc1"]
        blocks = sorted((int(k[5:]), k) for k in knn if k.startswith("block"))
        if blocks:
            m["block_knn20"] = [knn[k].get("20", {}).get("acc1") for _, k in blocks]
        return m
    last = {}
    for line in read_log(run.dir):
        last.update({k: v for k, v in line.items() if k.startswith("test_")})
    keys = {"sup": {"test_acc1": "top1", "test_acc5": "top5"}, "ss": {"test_ss_acc1": "ss_acc1"},
            "ssl": {"test_knn_acc1": "knn_monitor"}}[run.kind]
    return {new: last[old] for old, new in keys.items() if old in last}


def normalize(cmd, out):
    """The command as stored and compared: the interpreter as `python`, --out as $OUT."""
    return " ".join(shlex.quote(c) for c in ["python"] + cmd[1:]).replace(out.rstrip("/") + "/", "$OUT/")


def fmt_time(sec):
    sec = int(round(sec))
    return f"{sec // 3600}:{sec // 60 % 60:02d}:{sec % 60:02d}"


# =============================================================================================
# Running: subprocesses, or (--runner inprocess, jobs 1: the tests and the quickstart) each script's __main__
# in this process, which saves the ~4 s import of every run
# =============================================================================================
def start(run, args, log_path):
    """A subprocess for `run` (its output appended to log_path); in-process: run it now, returns its exit status."""
    cmd = run.command(args.nproc)
    header = f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(shlex.quote(c) for c in cmd)}\n"
    if args.runner == "subprocess":
        env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"), "PYTHONUNBUFFERED": "1",
               **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})}
        with open(log_path, "a") as log:
            log.write(header)
            log.flush()  # the child keeps its own copy of the file open
            return subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
    import runpy
    import torch
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    saved = sys.argv, os.getcwd(), torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    with open(log_path, "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        print(header, flush=True)
        sys.argv = cmd[1:]
        os.chdir(REPO)
        try:
            runpy.run_path(os.path.join(REPO, run.script), run_name="__main__")
            return 0
        except SystemExit as e:
            return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except Exception:
            traceback.print_exc()
            return 1
        finally:
            sys.argv = saved[0]
            os.chdir(saved[1])
            torch.set_num_threads(saved[2])


def execute(args, runs, plan, out, results_base, meta):
    """Run what is not finished, at most --jobs at a time, each when its dependencies are done; the results are
    rewritten after every finished run. Returns True when nothing failed."""
    t0, budget = args.t0, args.time_budget
    over = lambda: budget is not None and time.time() - t0 >= budget  # noqa: E731
    index = {r.name: f"[run {i + 1}/{len(runs)}]" for i, r in enumerate(runs)}
    done, failed, cut, executed = set(), set(), [], 0

    def finalize(run, seconds):  # metrics.json of a finished run; seconds: every attempt's wall time summed
        total = load_json(os.path.join(run.dir, "suite_time.json"), {}).get("seconds", 0.0) + seconds
        write_json(os.path.join(run.dir, "suite_time.json"), {"seconds": round(total, 2)})
        if run.finished():
            m = {"metrics": run_metrics(run), "seconds": round(total, 2) or None,
                 "images_per_s": round(run.images_seen() / total, 1) if total else None,
                 "command": normalize(run.command(args.nproc), out)}
            write_json(os.path.join(run.dir, "metrics.json"), m)
            return m

    for r in runs:
        if r.finished():
            done.add(r.name)
            if load_json(os.path.join(r.dir, "metrics.json")) is None:
                finalize(r, 0.0)
            print(f"{index[r.name]} {r.name}: finished, skipped", flush=True)
    skipped = len(done)
    pending = [r for r in runs if r.name not in done]
    running = {}  # name -> (run, Popen or exit status, start time)
    try:
        while pending or running:
            for r in list(pending):  # in plan order: the first ready run first
                if len(running) >= args.jobs or (failed and not args.keep_going) or over():
                    break
                if any(d in failed for d in r.deps):
                    pending.remove(r)
                    failed.add(r.name)
                    print(f"{index[r.name]} {r.name}: not run (a dependency failed)", flush=True)
                elif all(d in done for d in r.deps):
                    pending.remove(r)
                    os.makedirs(r.dir, exist_ok=True)
                    secs = [m["seconds"] for m in (load_json(os.path.join(p.dir, "metrics.json")) for p in plan)
                            if m and m.get("seconds")]
                    eta = fmt_time(statistics.mean(secs) * (len(pending) + 1) / args.jobs) if secs else "?"
                    print(f"{index[r.name]} {r.name} ... elapsed {fmt_time(time.time() - t0)}, ETA {eta}", flush=True)
                    t = time.time()
                    running[r.name] = (r, start(r, args, os.path.join(r.dir, "suite_log.txt")), t)
            if not running:
                if pending and not (failed and not args.keep_going) and not over():
                    sys.exit(f"error: cannot start {[r.name for r in pending]}: dependencies never finished")
                break
            ended = []
            while not ended and not over():  # wait for a run to end, or for the time budget to run out
                ended = [n for n, (r, p, t) in running.items() if isinstance(p, int) or p.poll() is not None]
                time.sleep(0 if ended else 0.5)
            if not ended:  # the budget is spent: stop what is still running (it resumes from its checkpoint)
                stop_all(running, finalize)
                cut += sorted(running)
                for n in sorted(running):
                    print(f"{index[n]} {n}: cut at the time budget ({fmt_time(time.time() - t0)}); not finished", flush=True)
                break
            for n in ended:
                r, p, t = running.pop(n)
                rc = p if isinstance(p, int) else p.returncode
                m = finalize(r, time.time() - t)
                if rc == 0 and m:
                    done.add(n)
                    executed += 1
                    shown = ", ".join(f"{k} {v:.2f}" for k, v in m["metrics"].items() if isinstance(v, float))
                    print(f"{index[n]} {n} done in {m['seconds']:.1f} s ({m['images_per_s']} img/s)"
                          f"{': ' + shown if shown else ''}", flush=True)
                    write_results(plan, out, results_base, meta, args)
                else:
                    failed.add(n)
                    log = os.path.join(r.dir, "suite_log.txt")
                    with open(log, errors="replace") as f:
                        lines = [line.rstrip() for line in f.read().replace("\r", "\n").splitlines() if line.strip()]
                    print(f"{index[n]} {n} FAILED (exit {rc}); log {log}:\n" + "\n".join(lines[-25:]), flush=True)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the runs stopped, their time kept
        stop_all(running, finalize)
        write_results(plan, out, results_base, meta, args)
        print(f"| interrupted after {fmt_time(time.time() - t0)}; run the same command again to continue", flush=True)
        raise SystemExit(130)
    write_results(plan, out, results_base, meta, args)
    if budget is not None and (cut or pending):
        print(f"| time budget of {budget:g} s spent: {executed} run(s) finished in this call, {skipped} before, "
              f"{len(cut)} cut ({', '.join(cut) or 'none'}), {len(pending)} not started, {len(failed)} failed or "
              f"blocked; run the same command again to continue", flush=True)
    else:
        print(f"| {executed} run(s) executed, {skipped} skipped (finished before), {len(failed)} failed or blocked; "
              f"wall time {fmt_time(time.time() - t0)}", flush=True)
    return not failed


def stop_all(running, finalize, grace=5.0):
    """SIGTERM to every subprocess still going, SIGKILL 5 s later (torchrun passes the signal to its ranks); each
    script resumes from its last checkpoint.pth (written atomically at the end of each epoch) next time."""
    procs = [(r, p, t) for r, p, t in running.values() if not isinstance(p, int)]
    for r, p, t in procs:
        p.terminate()
    deadline = time.time() + grace
    for r, p, t in procs:
        try:
            p.wait(max(0.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        finalize(r, time.time() - t)


# =============================================================================================
# Results: the rows with their claims, the teachers and their gaps; JSON and markdown
# =============================================================================================
def collect(plan, meta, P, carried=None, previous_rows=()):
    """The results of the plan's finished runs (their metrics.json). carried: {name: entry} of runs whose folder is
    gone (a wiped --out), taken from the previous results file where their command is the plan's (write_results);
    previous_rows: that file's rows, for a value computed from carried runs only that their entries cannot give
    again (a results file older than the per-block lists in its runs)."""
    stored = {r.name: load_json(os.path.join(r.dir, "metrics.json")) for r in plan}
    for name, m in (carried or {}).items():
        if stored.get(name) is None:
            stored[name] = {**m, "carried": True}
    before = {(e["key"], e["metric"]): e for e in previous_rows}
    reads = lambda key, s: ([f"sdssl_sd_eval_s{s}", f"sdssl_plain_eval_s{s}"] if key.startswith("sdssl_gain")  # noqa: E731
                            else [f"{key}_s{s}"])  # the runs a row's value at seed s comes from
    only_carried = lambda key, s: all((stored.get(n) or {}).get("carried") for n in reads(key, s))  # noqa: E731
    metrics = lambda name: (stored.get(name) or {}).get("metrics", {})  # noqa: E731
    seeds = meta["seeds"]

    def value(key, metric, s):
        if key.startswith("sdssl_gain"):  # SD - plain per block: the last one, or the mean of the others
            a, b = metrics(f"sdssl_sd_eval_s{s}").get("block_knn20"), metrics(f"sdssl_plain_eval_s{s}").get("block_knn20")
            if not a or not b or None in a or None in b:
                return None
            gains = [x - y for x, y in zip(a, b)]
            return gains[-1] if key.endswith("last") else statistics.mean(gains[:-1]) if len(gains) > 1 else None
        v = metrics(f"{key}_s{s}").get(metric)
        return v if isinstance(v, (int, float)) and math.isfinite(v) else None

    keys = {r.key for r in plan} | ({"sdssl_gain_last", "sdssl_gain_mid"} if "sdssl_sd_eval" in {r.key for r in plan}
                                    else set())
    rows = []
    for row in ROWS:
        if row.key not in keys:
            continue
        vals = [value(row.key, row.metric, s) for s in seeds]
        old = before.get((row.key, row.metric), {}).get("values") or []
        vals = [old[i] if v is None and only_carried(row.key, s) and i < len(old) else v for i, (v, s) in
                enumerate(zip(vals, seeds))]
        got = [v for v in vals if v is not None]
        rows.append({"paper": row.paper, "method": row.method, "metric": row.metric, "key": row.key,
                     "values": [None if v is None else round(v, 3) for v in vals],
                     "mean": round(statistics.mean(got), 3) if got else None,
                     "std": round(statistics.stdev(got), 3) if len(got) > 1 else (0.0 if got else None),
                     "claim": row.claim, "baselines": list(row.baselines), "holds": None})
    complete = lambda e: e is not None and None not in e["values"]  # noqa: E731  (a value for every seed)
    for e in rows:  # holds: the mean beats every baseline row's mean (all seeds present on both sides)
        base = [next((b for b in rows if b["key"] == k and b["metric"] == e["metric"]), None) for k in e["baselines"]]
        done = [i for i in range(len(seeds)) if base and None not in base and all(r["values"][i] is not None
                                                                                    for r in [e] + base)]
        if done and len(done) < len(seeds):  # a run cut short: the verdict over the seeds finished on every side
            means = [statistics.mean(r["values"][i] for i in done) for r in [e] + base]
            e["margin"], e["provisional"] = round(means[0] - max(means[1:]), 3), [seeds[i] for i in done]
            e["holds"] = e["margin"] > 0
        if base and complete(e) and all(complete(b) for b in base):
            top = max(base, key=lambda b: b["mean"])
            e["margin"] = round(e["mean"] - top["mean"], 3)
            e["holds"] = e["margin"] > 0
            # the margin against twice its standard error over seeds: a direction that seed noise could flip
            se = math.sqrt(sum((r["std"] or 0.0) ** 2 / len(r["values"]) for r in (e, top)))
            e["within_noise"] = len(e["values"]) < 2 or abs(e["margin"]) <= 2 * se
        if e["key"] in ("sdssl_plain_eval", "sdssl_sd_eval") and e["metric"] == "knn20":  # per-block k-NN curves
            curves = [c for c in (metrics(f"{e['key']}_s{s}").get("block_knn20") for s in seeds) if c and None not in c]
            if curves:
                e["per_block"] = [round(statistics.mean(c[i] for c in curves), 3) for i in range(len(curves[0]))]
            elif all(only_carried(e["key"], s) for s in seeds) and before.get((e["key"], e["metric"]), {}).get("per_block"):
                e["per_block"] = before[e["key"], e["metric"]]["per_block"]
    labels = {"teacher_ssl_probe": "teacher_ssl", "teacher_ssl_knn": "teacher_ssl (students' bank)"}
    teachers = {labels.get(name, name): {k: round(v, 3) for k, v in metrics(name).items() if isinstance(v, (int, float))}
                for name in ("teacher_vit", "teacher_vit_ss", "teacher_cnn", "teacher_cnn_ss", "teacher_cnn_ss_long",
                             "teacher_cnn_crops", "teacher_ssl_probe", "teacher_ssl_knn") if stored.get(name)}
    # the teachers' gaps (#23): each teacher over the same student trained without one (the ViT teacher over the
    # student alone; the assistant's k-NN, with the students' bank when it trained on other images, over the plain
    # self-supervised student), and the assistant over the best student it teaches (AttnDistill's rows)
    mean = {(e["key"], e["metric"]): e["mean"] for e in rows if e["mean"] is not None}
    gaps = {}
    if ("vitkd_alone", "top1") in mean and "top1" in teachers.get("teacher_vit", {}):
        gaps["vit_teacher_over_student_alone"] = round(teachers["teacher_vit"]["top1"] - mean["vitkd_alone", "top1"], 3)
    ssl = (teachers.get("teacher_ssl (students' bank)") or teachers.get("teacher_ssl") or {}).get("knn20")
    if ssl is not None and ("sdssl_plain_eval", "knn20") in mean:
        gaps["assistant_knn_over_ssl_student_alone"] = round(ssl - mean["sdssl_plain_eval", "knn20"], 3)
    taught = [mean[k, "knn20"] for k in ("attn_pa_eval", "attn_ad_eval") if (k, "knn20") in mean]
    if ssl is not None and taught:
        gaps["assistant_knn_over_its_best_student"] = round(ssl - max(taught), 3)
    runs = {r.name: {"seconds": m.get("seconds"), "images_per_s": m.get("images_per_s"), "command": m.get("command"),
                     "metrics": {k: round(v, 3) if isinstance(v, (int, float)) else [None if x is None else round(x, 3)
                                                                                      for x in v]
                                 for k, v in m["metrics"].items() if isinstance(v, (int, float, list))},
                     **({"carried": True} if m.get("carried") else {})}
            for r in plan if (m := stored.get(r.name))}
    return {**meta, "profile_settings": P, "runs_planned": len(plan), "runs_finished": len(runs),
            "teachers": teachers, "teacher_gaps": gaps, "runs": runs, "rows": rows,
            "run_keys": {r.name: r.key for r in plan if r.name in runs}}


def markdown(res):
    fmt = lambda v, d=2: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
    mach = res["machine"]
    L = [f"# CIFAR-10 reproduction: profile `{res['profile']}`, split `{res['split']}`", "",
         f"Machine: {mach.get('cpu')} ({mach.get('cores')} cores), GPU {mach.get('gpu') or 'none'}, torch "
         f"{mach.get('torch')}. Seeds {res['seeds']}; {res['runs_finished']} of {res['runs_planned']} runs finished.",
         "", f"Command: `{res['command']}`", "", "holds: the row's mean beats its baselines' means (margin in points); "
         "within noise: the margin is at most twice its standard error over the seeds.", ""]
    carried = [name for name, r in res["runs"].items() if r.get("carried")]
    if carried:
        L += [f"Carried from the previous results file ({len(carried)} runs whose folders are gone; each was made with "
              f"the command planned now, possibly by an earlier command on another machine): {', '.join(carried)}.", ""]
    secs = [r["seconds"] for r in res["runs"].values() if r.get("seconds")]
    if secs:
        jobs = res["profile_settings"].get("jobs") or 1
        L += [f"Wall time of the finished runs, summed: {fmt_time(sum(secs))} ({len(secs)} runs, {jobs} at a time: "
              f"about {fmt_time(sum(secs) / jobs)} of wall-clock time).", ""]
    if res["teachers"]:
        L += ["## Teachers", "", "| teacher | metric | value |", "|---|---|---|"]
        L += [f"| {name} | {METRIC_NAMES[k]} | {v:.2f} |" for name, m in res["teachers"].items() for k, v in m.items()
              if k in METRIC_NAMES]
        L.append("")
    g = res["teacher_gaps"]
    labels = {"vit_teacher_over_student_alone": "the ViT teacher's top-1 over the student alone's",
              "assistant_knn_over_ssl_student_alone": "the assistant's k-NN@20 over the plain self-supervised "
                                                      "student's (sdssl, no teacher)",
              "assistant_knn_over_its_best_student": "the assistant's k-NN@20 over its best AttnDistill student's"}
    parts = [f"{text} {g[k]:+.2f}" for k, text in labels.items() if k in g]
    if parts:
        L += ["Teacher gaps, in points (targets: +10 for the ViT teacher, +8 for the assistant over the students "
              "trained without it): " + "; ".join(parts) + ".", ""]
    for paper, title in PAPERS.items():
        rows = [r for r in res["rows"] if r["paper"] == paper]
        if not any(r["baselines"] for r in rows):  # no claim of this paper planned (a reference row alone says nothing)
            continue
        L += [f"## {paper}: {title}", "", "| row | metric | the paper's claim | ours: mean ± std (n) | per seed | holds |",
              "|---|---|---|---|---|---|"]
        for r in rows:
            n = sum(v is not None for v in r["values"])
            ours = f"{fmt(r['mean'])} ± {fmt(r['std'])} ({n})" if r["mean"] is not None else "-"
            holds = {True: "yes", False: "**no**", None: "" if not r["baselines"] else "-"}[r["holds"]]
            if r.get("margin") is not None:
                holds += f" ({r['margin']:+.2f}{', within noise' if r.get('within_noise') else ''})"
            if r.get("provisional"):
                holds += f", provisional: seed{'s' if len(r['provisional']) > 1 else ''} " \
                         f"{', '.join(map(str, r['provisional']))} of {len(r['values'])}"
            seeds = " / ".join(fmt(v, 1) for v in r["values"])
            L.append(f"| {r['method']} | {METRIC_NAMES[r['metric']]} | {r['claim']} | {ours} | {seeds} | {holds} |")
        curves = {r["key"]: r["per_block"] for r in rows if r.get("per_block")}
        if len(curves) == 2:
            plain, sd = curves["sdssl_plain_eval"], curves["sdssl_sd_eval"]
            L += ["", "Per-block k-NN@20 (CLS of each block after the final norm, mean over seeds):", "",
                  "| block | plain | SD | gain |", "|---|---|---|---|"]
            L += [f"| {i} | {a:.2f} | {b:.2f} | {b - a:+.2f} |" for i, (a, b) in enumerate(zip(plain, sd))]
        L.append("")
    if res["runs"]:
        L += ["## Wall time per run (mean over seeds)", "", "| run | runs | seconds | images/s |", "|---|---|---|---|"]
        groups = {}  # the seeds of one run together
        for name, r in res["runs"].items():
            groups.setdefault(res.get("run_keys", {}).get(name, name), []).append(r)
        for key, rs in groups.items():
            mean = lambda k, d: fmt(statistics.mean(v), d) if (v := [r[k] for r in rs if r.get(k)]) else "-"  # noqa: E731
            L.append(f"| {key} | {len(rs)} | {mean('seconds', 1)} | {mean('images_per_s', 0)} |")
        L.append("")
    return "\n".join(L)


def write_results(plan, out, results_base, meta, args):
    # runs finished by an earlier call whose folders are gone (--out wiped) keep their results when the previous
    # results file holds them with the command planned now; a run done again replaces them
    previous = load_json(results_base + ".json") or {}
    before = previous.get("runs", {})
    carried = {r.name: before[r.name] for r in plan if r.name in before  # (a training run evaluated apart: no metrics)
               and before[r.name].get("command") == normalize(r.command(args.nproc), out)}
    res = collect(plan, meta, PROFILES[args.profile], carried, previous.get("rows", ()))
    os.makedirs(os.path.dirname(results_base), exist_ok=True)
    write_json(results_base + ".json", res)
    with open(results_base + ".md.tmp", "w") as f:
        f.write(markdown(res))
    os.replace(results_base + ".md.tmp", results_base + ".md")


# =============================================================================================
# main
# =============================================================================================
def machine_info():
    """CPU model and cores, GPU name, torch version, without importing torch."""
    cpu = platform.processor() or ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    gpu = None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30).stdout.strip().replace("\n", ", ") or None
    from importlib.metadata import version
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": gpu, "torch": version("torch"),
            "python": platform.python_version()}


def stop(signum, frame):
    raise KeyboardInterrupt


def get_args_parser():
    p = argparse.ArgumentParser("reproduce_cifar10", description="Reproduce every paper's central claim on CIFAR-10 "
                                "(resumable; see the module docstring).")
    p.add_argument("--profile", default="smoke", choices=sorted(PROFILES), help="sizes and schedules (PROFILES at the top)")
    p.add_argument("--data", default="", help="the CIFAR-10 tarball or an unpacked root with train/ and test/ "
                   "(ignored by the synthetic profiles smoke and tiny)")
    p.add_argument("--split", default="test", choices=["val", "test"],
                   help="val: train on the training split minus a held-out carve and evaluate on the carve "
                        "(hyperparameter selection); test: the test split (the synthetic profiles have their own)")
    p.add_argument("--seeds", default=None, type=int, help="student seeds 0..N-1 (default: the profile's)")
    p.add_argument("--out", default="output/reproduce", help="runs go to OUT/<profile>_<split>/<run>, data to OUT/data")
    p.add_argument("--results_dir", default=None,
                   help="where cifar10_<profile>[_val].json / .md go (default: --out; the README's tables: bench/results)")
    p.add_argument("--only", default=[], nargs="+", choices=sorted(PAPERS),
                   help="only these papers' rows (and the teachers they need)")
    p.add_argument("--runs", default=[], nargs="+", metavar="NAME",
                   help="only these runs (names as --dry_run prints them, e.g. teacher_vit vitkd_alone_s0) and what "
                        "they need; with --only: both")
    p.add_argument("--nproc", default=1, type=int, help="processes per run (torchrun --nproc_per_node) when > 1")
    p.add_argument("--jobs", default=None, type=int, help="runs at a time (default: the profile's; one GPU can hold several)")
    p.add_argument("--runner", default=None, choices=["subprocess", "inprocess"],
                   help="inprocess: each script's __main__ in this process (saves the ~4 s import of every run; jobs 1); "
                        "default: the profile's (smoke, tiny: inprocess)")
    p.add_argument("--threads", default=None, type=int,
                   help="OMP_NUM_THREADS of every run (default: the profile's; 0: leave the environment alone)")
    p.add_argument("--keep_going", action="store_true", help="after a failed run, go on with the runs that do not need it")
    p.add_argument("--time_budget", default=None, type=float, metavar="SECONDS",
                   help="wall-clock budget from the start of this command: no run starts after it, runs still going "
                        "are stopped at it (they resume from their checkpoint next time), results are written for what "
                        "finished and the exit status is 0")
    p.add_argument("--dry_run", action="store_true", help="print the commands in execution order and exit")
    return p


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    args.t0 = time.time()
    P = PROFILES[args.profile]
    args.jobs = args.jobs or P["jobs"]
    args.runner = args.runner or P.get("runner", "subprocess")
    args.threads = P["threads"] if args.threads is None else args.threads
    if args.runner == "inprocess" and (args.jobs > 1 or args.nproc > 1):
        sys.exit("error: --runner inprocess runs one script at a time in one process (--jobs 1 --nproc 1)")
    out = os.path.abspath(args.out)
    seeds = list(range(args.seeds if args.seeds is not None else P["seeds"]))
    if not seeds:
        sys.exit("error: --seeds must be at least 1")
    teacher_data = None  # ({data flags}, images) of the teachers when they differ from the students'
    if "synthetic_size" in P["data"]:  # built-in shapes: the scripts make n training and n // 4 evaluation images
        split, n = "synthetic", P["data"]["synthetic_size"]
        data, images = {"dataset": "synthetic", "synthetic_size": n}, (n, max(n // 4, 10))
        data_info = {"dataset": "synthetic", "train_images": images[0], "eval_images": images[1]}
    else:
        if not args.data:
            sys.exit(f"error: --profile {args.profile} needs --data (the CIFAR-10 tarball or an unpacked root)")
        split, per_class, carve = args.split, P["data"].get("train_per_class"), P["data"]["val_per_class"]
        src = args.data if args.dry_run and not os.path.isdir(args.data) else source_root(args.data, out)
        root, ntr, nev = split_root(src, out, split, per_class, carve, args.dry_run)
        data, images = {"dataset": "imagefolder", "data_path": root}, (ntr, nev)
        data_info = {"dataset": "cifar10", "root": root.replace(out + "/", "$OUT/"), "train_images": ntr,
                     "eval_images": nev, "train_per_class": per_class, "val_per_class": carve, "split_seed": SPLIT_SEED}
        if P.get("teacher_data") == "all":  # teachers: every training image (minus the carve with --split val)
            troot, tntr, tnev = split_root(src, out, split, None, carve, args.dry_run)
            teacher_data = ({"dataset": "imagefolder", "data_path": troot, "input_size": 32}, (tntr, tnev))
            data_info.update(teacher_root=troot.replace(out + "/", "$OUT/"), teacher_train_images=tntr)
    data["input_size"] = 32
    workdir = os.path.join(out, f"{args.profile}_{split}")
    twork = os.path.join(out, f"{P['teachers_from']}_{split}") if P.get("teachers_from") else None
    plan = build_plan(P, workdir, data, images, seeds, teacher_data, twork)
    unknown = sorted(set(args.runs) - {r.name for r in plan})
    if unknown:
        sys.exit(f"error: --runs {unknown} are not runs of this plan (see --dry_run)")
    runs = restrict(plan, set(args.only), names=set(args.runs)) if args.only or args.runs else plan
    results_base = os.path.join(os.path.abspath(args.results_dir or out),  # default: under --out, not the checkout
                                f"cifar10_{args.profile}" + ("_val" if split == "val" else ""))
    if args.dry_run:
        for i, r in enumerate(runs):
            after = f", after {', '.join(r.deps)}" if r.deps else ""
            print(f"[run {i + 1}/{len(runs)}] {r.name} ({'finished' if r.finished() else 'to run'}{after})\n  "
                  f"{normalize(r.command(args.nproc), out)}")
        print(f"| {len(runs)} runs; results would go to {results_base}.json/.md; $OUT = {out}")
        return 0
    # a finished run whose stored command differs from the planned one (a profile edited after it ran) would mix two
    # settings in one table: stop before any work
    stale = [(r.name, m["command"], cmd) for r in plan if (m := load_json(os.path.join(r.dir, "metrics.json")))
             and m["command"] != (cmd := normalize(r.command(args.nproc), out)) and r.finished()]
    if stale:
        name, old, new = stale[0]
        sys.exit(f"error: {len(stale)} finished run(s) under {workdir} were made with other arguments, e.g. {name}:\n"
                 f"  was: {old}\n  now: {new}\npick another --out, or remove those run folders to redo them")
    command = ["python", "bench/reproduce_cifar10.py"] + list(sys.argv[1:] if argv is None else argv)
    meta = {"profile": args.profile, "split": split, "seeds": seeds, "machine": machine_info(), "data": data_info,
            "command": " ".join(shlex.quote(a) for a in command)}
    os.makedirs(workdir, exist_ok=True)
    previous = signal.signal(signal.SIGTERM, stop)  # a scheduler's kill stops like Ctrl-C: time kept, runs stopped
    print(f"| profile {args.profile}, split {split}, seeds {seeds}: {len(runs)} runs in {workdir}; results in "
          f"{results_base}.json/.md", flush=True)
    try:
        return 0 if execute(args, runs, plan, out, results_base, meta) else 1
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
