"""A teacher's top-1 on the images a vitkd.py student trains on: the whole images (the evaluation transform) and the
student's own training views (DeiT's transform as vitkd.py builds it from the same flags: random-resized crop and
flip, RandAugment and erasing as given), averaged over --passes draws. DeiT's hard distillation token learns the
teacher's argmax on those views: where the teacher labels fewer of them right than the ground truth does, the token
has nothing to add (#32).

  python bench/teacher_on_crops.py --teacher_weights T/checkpoint.pth --data_path ROOT --input_size 32 --randaug= \
      --reprob 0 [--passes 3]

Every flag but --passes is vitkd.py's (the students' data flags); the images are ROOT's training split.
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
import common  # noqa: E402
import vitkd  # noqa: E402


def top1(teacher, dataset, batch_size, device):
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=0)
    right = seen = 0
    with torch.no_grad():
        for x, y in loader:
            right += (teacher(x.to(device)).argmax(-1).cpu() == y).sum().item()
            seen += len(y)
    return 100.0 * right / seen


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], parents=[vitkd.get_args_parser()])
    p.add_argument("--passes", default=3, type=int, help="draws of the training views averaged")
    args = p.parse_args(argv)
    if not args.teacher_weights:
        common.fail("--teacher_weights is required")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    stats = common.data_stats(args)  # the students' normalisation; the teacher renormalises as in vitkd.py
    teacher = common.build_teacher(args.teacher, args.teacher_weights, args.teacher_key, stats, args.teacher_mean,
                                   args.teacher_std, img_size=args.input_size, trust=args.trust_checkpoint,
                                   **common.shape_args(args, "teacher_")).to(device).eval()
    whole = common.build_dataset(args, "train", common.build_transform(args, False))
    views = common.build_dataset(args, "train", common.build_transform(args, True, args.randaug, args.reprob))
    res = {"teacher": args.teacher_weights, "images": len(whole), "whole_top1": top1(teacher, whole, 256, device)}
    common.seed_everything(args.seed)  # the views' draws: --seed alone decides them
    res["views_top1"] = [top1(teacher, views, 256, device) for _ in range(args.passes)]
    res["views_top1_mean"] = sum(res["views_top1"]) / len(res["views_top1"])
    print(json.dumps(res))


if __name__ == "__main__":
    main()
