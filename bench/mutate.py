#!/usr/bin/env python
"""Mutation runner (standard library only): do the CPU tests fail when a method is wrong?

Each mutation plants one realistic one-line bug in a temporary copy of the repository's tracked files
(`git ls-files`; the checkout itself is never touched) and runs only the relevant tests there:
    python -m pytest -q -x test_smoke.py -k <expr>
caught = the tests fail, survived = they pass, invalid = the original text is not found exactly once in the
file (a stale mutation is reported, never skipped silently), timeout = the run took longer than --timeout
(counted as caught: a hang is a detected change, but it is printed apart so that it can be looked at).

    python bench/mutate.py --list              # the mutations, numbered
    python bench/mutate.py                     # all of them, one line each, then caught / valid (percent)
    python bench/mutate.py --only 3 17 --jobs 2 --timeout 300 --out mutation.json
    python bench/mutate.py --k pinned          # every mutation against the pinned values alone (#30)
    python bench/mutate.py --k all             # every mutation against the whole suite
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Passes (2026-11-30): the first caught 42 / 52; after the tests it led to (end_epoch's guards called directly, the
# per-epoch seed, SSTA's head choice against fixed importances, SSKD's positive columns and attention transfer by
# hand, SSTA's CE weight and SD's alpha at step 0 through a logged step, L_pred as a sum over layers) a second full
# pass caught 49 / 52; the three survivors (AttnDistill's CLS weight, SSKD's L_T label order, SD's EMA momentum
# reaching 1) got tests too; the third full pass caught 52 / 52 (334 s on 2 cores, one busy with another job).
# 2026-12-07 (#33): 19 new mutations (a target from another network, a module's layer sequence, every method):
# 19 / 19 with their selected tests and 19 / 19 with the whole suite (--k all); the pinned values alone (--k pinned)
# catch 32 of the 41 loss / schedule mutations (the 9 others are invisible at the pinned flags). Details and every
# row: bench/results/mutation_pass.txt. 2026-12-07 (#31): 9 mutations (84-92) of the attention from q and k, the device
# augmentation and the data share; 4 (93-96) of SSKD's cross-architecture path (#32).
# Later #31 sessions: 102-103 (SDSSL's one loss per view, carried results), 104-108 (AttnDistill on logits, the CLS row
# as a product-sum, SSKD's SS module in fp32): each caught by its tests (bench/results/mutation_pass.txt).
# (file, exact original text (found exactly once), replacement, pytest -k expression, the bug it plants)
MUTATIONS = [
    # ---- common.py: shared losses, schedules, safety checks, resume --------------------------------------------
    ("common.py", 'return F.kl_div(log_s, log_t, reduction="batchmean", log_target=True) * temperature ** 2',
     'return F.kl_div(log_t, log_s, reduction="batchmean", log_target=True) * temperature ** 2',
     "nkd_and_kd_losses", "Hinton KD direction: KL(s||t) instead of KL(t||s)"),
    ("common.py", 'return F.kl_div(log_s, log_t, reduction="batchmean", log_target=True) * temperature ** 2',
     'return F.kl_div(log_s, log_t, reduction="batchmean", log_target=True)',
     "nkd_and_kd_losses", "Hinton KD without its T^2 factor"),
    ("common.py", "return kl * temperature ** 2 / s.numel()", "return kl * temperature ** 2 / len(s)",
     "token_losses_by_hand", "DeiT soft token loss divided by the batch instead of B x C"),
    ("common.py", "    if step < warmup_steps:\n        return start", "    if step < 0:\n        return start",
     "schedule_lr_rule or sdssl_losses_and_alpha_ramp", "cosine schedule: the linear warm-up skipped"),
    ("common.py", "return final + (base - final) * 0.5 * (1.0 + math.cos(math.pi * t))",
     "return final + (base - final) * (1.0 + math.cos(math.pi * t))",
     "schedule_lr_rule or sdssl_losses_and_alpha_ramp", "cosine schedule without the 1/2: starts at 2 x base"),
    ("common.py", "lr = args.blr * global_batch / base_batch", "lr = args.blr",
     "schedule_lr_rule", "lr scaling rule dropped (blr used as the absolute lr)"),
    ("common.py", "(no_decay if p.ndim <= 1 or n.endswith", "(no_decay if p.ndim < 1 or n.endswith",
     "schedule_lr_rule or weight_decay_groups", "weight decay applied to norms' 1-D weights"),
    ("common.py", "        if bad > 0:\n            fail(f\"non-finite loss", "        if bad > 1:\n            fail(f\"non-finite loss",
     "schedule_lr_rule", "a non-finite loss stops the run only when two ranks see it"),
    ("common.py", "bad = [k for k, v in stats.items() if isinstance(v, float) and not math.isfinite(v)]",
     "bad = []", "end_epoch_refuses", "end_epoch writes a checkpoint despite a non-finite metric"),
    ("common.py", "w, neighbours = (sim / temperature).exp(), bank_y[idx]", "w, neighbours = sim.exp(), bank_y[idx]",
     "knn_matches", "k-NN vote weights without the temperature"),
    ("common.py", "s = seed + 1000 * epoch + get_rank()", "s = seed + get_rank()",
     "every_epoch_draws", "seeds not advanced per epoch (every epoch draws the same numbers)"),
    # ---- vitkd.py ---------------------------------------------------------------------------------------------
    ("vitkd.py", "first = -(t.softmax(1).gather(1, y) * s.log_softmax(1).gather(1, y)).mean()",
     "first = -(s.log_softmax(1).gather(1, y)).mean()", "nkd_and_kd_losses", "NKD's target term not weighted by T_y"),
    ("vitkd.py", "return first + gamma * temperature ** 2 * second", "return first + gamma * second",
     "nkd_and_kd_losses", "NKD's non-target term without tau^2"),
    ("vitkd.py", 'p_t = (t / temperature).masked_fill(is_target, float("-inf")).softmax(1)',
     "p_t = (t / temperature).softmax(1)", "nkd_and_kd_losses", "NKD's teacher non-target distribution keeps the target class"),
    ("vitkd.py", "loss_lr = self.alpha * sum(d.pow(2).sum() for d in diffs) / B",
     "loss_lr = self.alpha * sum(d.pow(2).sum() for d in diffs)", "vitkd_losses_match", "ViTKD mimic loss not divided by the batch"),
    ("vitkd.py", "loss_gen = self.beta * (err * mask).sum() / B / self.mask_ratio",
     "loss_gen = self.beta * (err * mask).sum() / B", "vitkd_losses_match", "ViTKD generation loss not divided by the mask ratio"),
    ("vitkd.py", "loss_gen = self.beta * (err * mask).sum() / B / self.mask_ratio",
     "loss_gen = self.beta * err.sum() / B / self.mask_ratio", "vitkd_losses_match",
     "ViTKD generation loss over all tokens instead of the masked ones"),
    ("vitkd.py", "x = torch.where(mask[..., None], self.mask_token.to(x.dtype), x)",
     "x = torch.where(~mask[..., None], self.mask_token.to(x.dtype), x)", "vitkd_losses_match",
     "mask token placed at the visible tokens"),
    ("vitkd.py", "        return rank < n", "        return rank <= n", "vitkd_losses_match",
     "ViTKD mask count off by one"),
    ("vitkd.py", "corr = lambda f: f.float() @ f.float().transpose(-1, -2) / math.sqrt(f.shape[-1])",
     "corr = lambda f: f.float() @ f.float().transpose(-1, -2)", "vitkd_losses_match",
     "correlation mimic without the 1/sqrt(D) scale"),
    ("vitkd.py", "state = dict(model=student, vitkd=vitkd, optimizer=optimizer, scaler=scaler)", "state = dict(model=student, vitkd=vitkd, scaler=scaler)",
     "vitkd_end_to_end_resume", "resume drops the optimizer state (AdamW moments restart)"),
    # ---- ssta.py ----------------------------------------------------------------------------------------------
    ("ssta.py", "p, q = (s, t) if reverse else (t, s)", "p, q = (t, s) if reverse else (s, t)",
     "attention_kd_loss_matches", "attention KD direction: KL(s||t) by default"),
    ("ssta.py", "best = max(range(len(accs)), key=lambda i: (acc_all - accs[i], -i))",
     "best = min(range(len(accs)), key=lambda i: (acc_all - accs[i], -i))",
     "ssta_keeps_the_heads", "SSTA picks the least important heads"),
    ("ssta.py", "    return a / a.sum(-1, keepdim=True)\n\n\ndef attention_transfer",
     "    return a\n\n\ndef attention_transfer", "attention_kd_loss or drops_the_token",
     "maps without the distillation token not renormalised"),
    ("ssta.py", "        return taps.maps(blocks, heads, cls_patches=True)",
     "        return taps.maps(blocks, [0] * len(heads), cls_patches=True)",
     "attention_kd_loss or ssta_end_to_end or ssta_target_source", "teacher map always from head 0, not the selected head"),
    ("ssta.py", "a_s = F.normalize(s_tokens[:, npt:].float().pow(2).mean(-1), dim=1)",
     "a_s = s_tokens[:, npt:].float().pow(2).mean(-1)", "attention_kd_loss or ssta_ablations or attention_transfer_by_hand",
     "attention transfer: student map not L2-normalised"),
    ("ssta.py", "w_ce = args.alpha * (1 - args.token_weight", "w_ce = (1 - args.token_weight",
     "ce_weight_and_sdssl_alpha or ssta_end_to_end", "SSTA's CE weight alpha ignored"),
    ("ssta.py", "state = dict(model=student, optimizer=optimizer, scaler=scaler)", "state = dict(model=student, scaler=scaler)",
     "ssta_end_to_end", "SSTA resume drops the optimizer state"),
    # ---- sskd.py ----------------------------------------------------------------------------------------------
    ("sskd.py", "return (scores > scores.gather(1, positive[:, None])).sum(1)",
     "return (scores >= scores.gather(1, positive[:, None])).sum(1)", "sskd_selective",
     "error level counts ties against the positive (and the positive itself)"),
    ("sskd.py", "return ~wrong | (rank - (~wrong).sum() < k)", "return ~wrong | (rank >= len(rank) - k)",
     "sskd_selective", "selective transfer keeps the worst-ranked wrong rows instead of the best"),
    ("sskd.py", "k = (wrong.sum().double() * ratio).floor()", "k = (wrong.sum().double() * (1 - ratio)).floor()",
     "sskd_selective", "selective transfer ratio inverted"),
    ("sskd.py", "return torch.arange(batch, device=device).repeat_interleave(3)",
     "return torch.arange(batch, device=device).repeat(3)", "sskd_positive_columns or sskd_selective or rotate_views",
     "positive column of transformed views in view-major instead of image-major order"),
    ("sskd.py", "z = F.normalize(z.float(), dim=1)", "z = z.float()", "sskd_selective or sskd_stages",
     "SS similarities not normalised (dot products, not cosines)"),
    ("common.py", "return (kl * keep).sum() / keep.sum().clamp_min(1) * temperature ** 2",
     "return kl.mean() * temperature ** 2", "sskd_selective or sskd_stages",
     "masked KD ignores the selective-transfer mask"),
    ("sskd.py", "y = target.repeat_interleave(3)", "y = target.repeat(3)", "tf_labels_are_image_major",
     "L_T's labels of transformed views in the wrong order"),
    # ---- sdssl.py ---------------------------------------------------------------------------------------------
    ("sdssl.py", "common.cosine_schedule(step, total, 0.0, args.alpha_max)",
     "common.cosine_schedule(step, total, args.alpha_max, 0.0)", "ce_weight_and_sdssl_alpha or sdssl_losses_and_alpha_ramp",
     "alpha ramp runs down from alpha_max instead of up from 0"),
    ("sdssl.py", "torch._foreach_add_(tp, sp, alpha=1.0 - momentum)", "torch._foreach_add_(tp, sp, alpha=momentum)",
     "schedule_lr_rule or sdssl_teacher_moves", "EMA adds momentum x student instead of (1 - momentum)"),
    ("sdssl.py", "m = common.cosine_schedule(step + 1, total, args.momentum, 1.0)", "m = args.momentum",
     "tf_labels_are_image_major or sdssl_teacher_moves", "EMA momentum not scheduled to 1"),
    ("sdssl.py", "return F.cross_entropy(q @ keys.T / tau, labels, reduction=reduction) * 2 * tau",
     "return F.cross_entropy(q @ keys.T / tau, labels, reduction=reduction)", "sdssl_losses_and_alpha_ramp or plain_framework",
     "MoCo v3 loss without its 2 tau factor"),
    ("sdssl.py", "d = 2 - 2 * F.cosine_similarity(p.float(), z.float().detach(), dim=-1)",
     "d = 1 - F.cosine_similarity(p.float(), z.float().detach(), dim=-1)",
     "sdssl_losses_and_alpha_ramp or plain_framework", "BYOL loss 1 - cos instead of 2 - 2 cos"),
    ("sdssl.py", "own, pos = i + n * common.get_rank(), (i + n // 2) % n + n * common.get_rank()",
     "own, pos = i + n * common.get_rank(), (i + 1) % n + n * common.get_rank()",
     "sdssl_losses_and_alpha_ramp or projector_batchnorm or plain_framework", "NT-Xent positive is the next row, not the other view"),
    ("sdssl.py", "pred = pred + per_layer[L:].sum()",
     "pred = pred + per_layer[L:].mean()", "prediction_loss_is_a_sum or sdssl_losses_and_alpha_ramp",
     "L_pred as a mean over layers instead of a sum (x L)"),
    ("sdssl.py", "state = dict(model=student, heads=heads, optimizer=optimizer, scaler=scaler)", "state = dict(model=student, heads=heads, scaler=scaler)",
     "sdssl_learns_and_resumes", "SDSSL resume drops the optimizer state"),
    # ---- attn_distill.py --------------------------------------------------------------------------------------
    ("attn_distill.py", "d = (t * (t.log() - s.log())) if distance == \"kl\" else (s - t).pow(2)",
     "d = (s * (s.log() - t.log())) if distance == \"kl\" else (s - t).pow(2)", "attn_distill_functions",
     "AttnDistill KL direction: KL(s||t)"),
    ("attn_distill.py", "return (logs.sum(1) / temperature).softmax(-1)", "return (logs.sum(1) * temperature).softmax(-1)",
     "attn_distill_functions or logsum", "log-sum head aggregation multiplies by T instead of dividing"),
    ("attn_distill.py", "patches = patches * (1 - a0) / patches.sum(-1, keepdim=True)",
     "patches = patches / patches.sum(-1, keepdim=True)", "attn_distill_functions",
     "resized CLS rows: patch mass not 1 - a_CLS (rows no longer sum to 1)"),
    ("attn_distill.py", "    return d.sum() / len(s)", "    return d.mean()", "attn_distill_functions",
     "AttnDistill loss averaged over keys and heads instead of summed, per batch"),
    ("attn_distill.py", "loss = args.cls_weight * losses[\"cls\"] + args.lambda_attn", "loss = losses[\"cls\"] + args.lambda_attn",
     "weighted_sum_of_its_logged_terms", "the CLS loss weight ignored"),
    # ---- eval_knn_linear.py -----------------------------------------------------------------------------------
    ("eval_knn_linear.py", "2 / (n - 2) * rk @ rl.T) / (n * (n - 3))", "1 / (n - 2) * rk @ rl.T) / (n * (n - 3))",
     "minibatch_cka", "unbiased HSIC's cross term with factor 1 instead of 2"),
    ("eval_knn_linear.py", "torch.meshgrid(torch.arange(gh) * ph, torch.arange(gw) * pw",
     "torch.meshgrid(torch.arange(gh), torch.arange(gw)", "mean_attention_distance",
     "mean attention distance in patches instead of pixels"),
    ("eval_knn_linear.py", "(before < share).to(rows)", "(before <= share).to(rows)", "mean_attention_distance",
     "attention threshold keeps one key too many on a boundary"),
    ("eval_knn_linear.py", "rows = attn[:, :, 0, num_prefix_tokens:].float()", "rows = attn[:, :, 0, 1:].float()",
     "mean_attention_distance or look_inside", "CLS rows keep the extra prefix tokens as patches"),
    # ---- resume: restore() and what each script saves (#24, #25) -----------------------------------------------
    ("common.py", "        if obj is not None:\n            if isinstance(obj, nn.Module):", "        if obj is not None and isinstance(obj, nn.Module):\n            if isinstance(obj, nn.Module):",
     "resume_exactly", "restore() skips the optimizer and the scaler (AdamW / SGD moments restart)"),
    ("sskd.py", "    state.update(optimizer=optimizer, scaler=scaler)", "    state.update(scaler=scaler)",
     "resume_exactly", "SSKD's resume forgets SGD's momentum buffers"),
    ("common.py", "            obj.load_state_dict(ckpt[name])\n    return ckpt[\"epoch\"]",
     "            if not isinstance(obj, nn.Module):\n                obj.load_state_dict(ckpt[name])\n    return ckpt[\"epoch\"]",
     "resume_exactly", "restore() loads the optimizer and scaler but not the modules' weights"),
    ("attn_distill.py", "                 optimizer=optimizer, scaler=scaler)\n    start_epoch", "                 scaler=scaler)\n    start_epoch",
     "resume_exactly", "AttnDistill's resume forgets AdamW's moments"),
    # ---- each script's own optimizer step (#25 moved it out of common.py) --------------------------------------
    *[(f, line, line.replace("args.clip_grad)", "args.clip_grad * 1e12)"), "gradient_clipping",
       f"{f}: --clip_grad no longer clips")
      for f, line in (("vitkd.py", 'nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], args.clip_grad)'),
                      ("ssta.py", "nn.utils.clip_grad_norm_(student.parameters(), args.clip_grad)"),
                      ("sdssl.py", 'nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], args.clip_grad)'),
                      ("attn_distill.py", "nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)"))],
    ("ssta.py", 'student_head = {"teacher": 0, "ta": 1} if args.assignment == "eq"',
     'student_head = {"teacher": 1, "ta": 0} if args.assignment == "eq"', "ssta",
     "SSTA: the assistant teaches student head 0 and the teacher head 1 (the paper: the opposite)"),
    ("ssta.py", '(args.beta if name == "teacher" else args.lambda_ta) * kl', '(args.lambda_ta if name == "teacher" else args.beta) * kl',
     "ssta_ce_weight", "SSTA: beta and lambda swapped between the teacher and the assistant"),
    ("attn_distill.py", "lr = common.resolve_lr(args, args.accum_iter)", "lr = common.resolve_lr(args)", "resume_exactly",
     "AttnDistill's lr scaled by the batch of one step, not by the accumulated batch (x accum_iter)"),
    # ---- #33: a target from another network, a module's layer sequence ---------------------------------------------
    # targets: each loss term's target read from a network (or view) it must not come from
    ("sdssl.py", 'per_layer = loss_fn(q.flatten(0, 1), z[1 - v]).view(len(q), -1).mean(1)',
     'per_layer = loss_fn(q.flatten(0, 1), out[1 - v]["h_last"]).view(len(q), -1).mean(1)',
     "sdssl_target_source or prediction_loss_is_a_sum",
     "SD-MoCo v3 / SD-BYOL: L_isd's target is the student's own last-layer projection of the other view, not the momentum teacher's"),
    ("attn_distill.py", 'rows_t = resize_cls_attention(rows["teacher"], grids[1], grids[0])',
     'rows_t = rows["student"].detach()',
     "attn_distill_target_source or attn_distill_on_cls_rows", "AttnDistill: L_a's target is the student's own CLS row"),
    ("attn_distill.py", "t_tokens = teacher.forward_features(images)  # final-norm tokens",
     "t_tokens = common.unwrap(model).backbone.forward_features(images)  # final-norm tokens",
     "attn_distill_target_source or step_loss_is_the_weighted_sum",
     "AttnDistill: L_c's target is the student's own final-norm CLS, not the teacher's"),
    ("vitkd.py", 'losses["mimic"], losses["gen"] = vitkd(s_low, t_low, s_high, t_high)',
     'losses["mimic"], losses["gen"] = vitkd(s_low, t_low, s_high, s_high)',
     "vitkd_target_source or vitkd_losses_match", "ViTKD: the generation target is the student's own last-layer tokens"),
    ("vitkd.py", 'for name, m in (("student", student), ("teacher", teacher))}',
     'for name, m in (("student", student), ("teacher", student))}',
     "vitkd_target_source or vitkd_gradients_reach", "ViTKD: the teacher's taps on the student (mimic and generation targets from the student)"),
    ("vitkd.py", 'losses["nkd"] = nkd_loss(logits, t_out, hard,', 'losses["nkd"] = nkd_loss(logits, logits, hard,',
     "vitkd_target_source or nkd_and_kd_losses", "NKD's target: the student's own logits, not the teacher's"),
    ("vitkd.py", 'losses["kd"] = args.kd_weight * kd_loss(logits, t_out, args.kd_temperature)',
     'losses["kd"] = args.kd_weight * kd_loss(logits, logits, args.kd_temperature)',
     "vitkd_target_source or nkd_and_kd_losses", "ViTKD's KD target: the student's own logits, not the teacher's"),
    ("vitkd.py", 'common.token_loss(dist_logits, t_out, args.distill_token, args.kd_temperature)',
     'common.token_loss(dist_logits, logits, args.distill_token, args.kd_temperature)',
     "vitkd_target_source or token_losses_by_hand",
     "DeiT's distillation token learns the student's own class head, not the teacher"),
    ("ssta.py", "teacher_maps(taps[name], pairs[name])", 'teacher_maps(taps["ta"], pairs[name])',
     "ssta_target_source or attention_kd_loss", "SSTA: the supervised teacher's term reads the assistant's maps"),
    ("sskd.py", "common.kd_loss(logits, t_logits, args.kd_temperature, rows=True)",
     "common.kd_loss(logits, t_logits.unflatten(0, (-1, 4))[:, :1].expand(-1, 4, -1).flatten(0, 1), args.kd_temperature, rows=True)",
     "sskd_target_source or sskd_selective", "SSKD: L_T's target is the teacher's prediction on the normal view, not on the same transformed view"),
    ("sskd.py", "sim_t = similarities(t_ss(t_feat), normal, transformed)",
     "sim_t = similarities(t_ss(feat.detach()), normal, transformed)",
     "sskd_target_source or sskd_selective", "SSKD: L_ss's target: the teacher's SS module on the student's features"),
    ("sskd.py", "common.kd_loss(logits, t_logits, args.kd_temperature, rows=True)",
     "common.kd_loss(logits, logits, args.kd_temperature, rows=True)",
     "sskd_target_source or sskd_selective", "SSKD: KD's target is the student's own logits"),
    # modules: a layer sequence that is not the paper's / official code's
    ("attn_distill.py", "        if i < layers - 1:\n            mods.append(nn.GELU())", "        if i < layers:\n            mods.append(nn.GELU())",
     "attn_distill_module_definition or attn_distill_projector_widths",
     "AttnDistill: P ends in a GELU after its last Linear (the official get_mlp_student does not)"),
    ("vitkd.py", "nn.Conv2d(teacher_dim, teacher_dim, 3, padding=1), nn.ReLU(inplace=True),",
     "nn.Conv2d(teacher_dim, teacher_dim, 3, padding=1), nn.GELU(),",
     "vitkd_module_definition or vitkd_losses_match", "ViTKD's generator with a GELU between its convolutions, not a ReLU"),
    ("vitkd.py", "return nn.Linear(student_dim, teacher_dim) if student_dim", "return nn.Linear(student_dim, teacher_dim, bias=False) if student_dim",
     "vitkd_module_definition or vitkd_losses_match", "ViTKD's adapters without a bias"),
    ("ssta.py", 'taps.maps([layer])[0].mean(1)', 'taps.maps([layer])[0].sum(1)',
     "ssta_module_definition or attention_kd_loss", "SSTA --head_mode avg: the sum of the heads' maps (rows sum to H), not their mean"),
    ("sskd.py", "nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, dim))",
     "nn.Sequential(nn.Linear(dim, dim), nn.BatchNorm1d(dim), nn.ReLU(inplace=True), nn.Linear(dim, dim))",
     "sskd_module_definition or sskd_selective", "SSKD's SS module with a BatchNorm after its first Linear"),
    ("sdssl.py", "GlobalBatchNorm(n * b, affine=not last)", "GlobalBatchNorm(n * b)",
     "sdssl_module_definition or batched_heads_equal", "SDSSL: the heads' last BatchNorm with affine parameters"),
    ("sdssl.py", "                x = F.relu(x)", "                x = F.gelu(x)",
     "sdssl_module_definition or batched_heads_equal", "SDSSL: the heads' hidden activation GELU, not ReLU"),
    # ---- #31: no host sync in a training step --------------------------------------------------------------------
    ("common.py", "        if it % every == 0 or it == steps - 1:\n            self.read(",
     "        self.read(f\"at epoch {epoch} iteration {it}\")\n        if it % every == 0 or it == steps - 1:\n            self.read(",
     "waits_for_no_host_sync", "the meter reads the device sums (and checks them) at every step"),
    ("sskd.py", "k = (wrong.sum().double() * ratio).floor()", "k = int(int(wrong.sum()) * ratio)",
     "waits_for_no_host_sync", "SSKD's selective transfer counts its wrong rows on the host"),
    # ---- #31: the attention a method reads, from q and k; device augmentation equal to PIL; the data share --------
    ("common.py", "            scores = ((q if rows is None else q[..., :rows, :]) * scale) @ k.transpose(-2, -1)", "            scores = (q if rows is None else q[..., :rows, :]) @ k.transpose(-2, -1)",
     "attention_from_q_and_k or taps", "the taps' maps without timm's 1 / sqrt(d) scale"),
    ("common.py", "            q, k = (torch.cat([t[..., :1, :], t[..., npt:, :]], -2) for t in (q, k))",
     "            q, k = (t[..., npt - 1:, :] for t in (q, k))",
     "attention_from_q_and_k or drops_the_token or attention_kd_loss",
     "cls_patches keeps the distillation token and drops CLS"),
    ("ssta.py", "    return (p * (p.log() - q.log())).sum(-1).mean((-2, -1))",
     "    return (p * (p.log() - q.log())).sum(-1).mean(-1).sum(-1)",
     "attention_kd_loss or ssta_target_source or pinned", "SSTA's KL summed over the batch, not averaged"),
    ("attn_distill.py", 'a = taps[who].maps(blocks[0] if one else blocks, rows="cls", logits=logits[who])',
     "a = taps[who].maps(blocks[0] if one else blocks, rows=2, logits=logits[who])[..., 1, :]",
     "attn_distill_target_source or cls_rows_trains or pinned", "AttnDistill reads the first patch's row, not the CLS row"),
    ("sdssl.py", "    f_mid = common.unwrap(student).norm(torch.stack([taps.tokens[l][:, 0] for l in mid])) if mid else None",
     "    f_mid = torch.stack([taps.tokens[l][:, 0] for l in mid]) if mid else None",
     "sd_ or sdssl_target_source or pinned", "SDSSL's intermediate CLS rows without the final norm"),
    ("common.py", "    return torch.where(inside, out.trunc_().clamp_(0, 255), fill.to(dtype).view(1, C, 1, 1)).float()",
     "    return torch.where(inside, out.round_().clamp_(0, 255), fill.to(dtype).view(1, C, 1, 1)).float()",
     "device_randaugment", "RandAugment's geometric ops round where PIL's affine truncates"),
    ("common.py", "            near, far = (1.5 * t - 2.5) * t * t + 1, (((t - 5) * t + 8) * t - 4) * -0.5",
     "            near, far = (1.25 * t - 2.25) * t * t + 1, (((t - 5) * t + 8) * t - 4) * -0.75",
     "memory_crops or transforms_equal_pil", "the memory crop's bicubic with a = -0.75 (PyTorch's), not PIL's -0.5"),
    ("common.py", "                    key = ((\"affine\", kwargs.get(\"resample\", 3), tuple(kwargs.get(\"fillcolor\") or (128, 128, 128)))",
     "                    key = ((\"affine\", 3, tuple(kwargs.get(\"fillcolor\") or (128, 128, 128)))",
     "device_randaugment", "every image of a geometric group resampled bicubic, whatever filter timm drew for it"),
    ("common.py", "        data = f\"  data {100 * (self.wait + device) / elapsed:.0f}%\"",
     "        data = f\"  data {100 * self.wait / elapsed:.0f}%\"",
     "data_share", "the data share leaves out the device part of the fast pipelines"),
    # ---- #32: SSKD across architectures (a CNN teacher for a ViT student), what the older tests let through ------
    ("common.py", "    model.train = lambda mode=True: model\n", "    model.train = lambda mode=True: nn.Module.train(model, mode)\n",
     "sskd_cnn_ or frozen_teacher", "a frozen teacher can be switched back to train mode (BatchNorm on batch statistics)"),
    ("common.py", "        return (x * made[key][0] + made[key][1],) + tuple(inputs[1:])", "        return inputs",
     "sskd_cnn_", "the teacher sees the data's normalisation, not its own"),
    ("sskd.py", "        if \"ss_head\" in saved:\n            t_ss.load_state_dict(saved[\"ss_head\"])",
     "        if \"ss_head\" in saved:\n            pass",
     "sskd_cnn_", "the teacher's trained SS module is not loaded (a random one scores the views)"),
    ("sskd.py", "    return getattr(model, \"head_hidden_size\", None) or model.num_features", "    return model.num_features",
     "sskd_cnn_", "SS modules sized by num_features (wrong for CNNs that widen the pooled feature, e.g. lcnet_050)"),
    # 2026-12-07 evening (#31 / #32)
    ("attn_distill.py", "with torch.autocast(x.device.type, enabled=False):",
     "with torch.autocast(x.device.type, enabled=torch.is_autocast_enabled(x.device.type)):",
     "projector_runs_in_fp32", "AttnDistill's P on the CLS under the step's autocast (bf16 weight copies), not fp32"),
    ("common.py", "            q, k = self.qk[blocks]\n", "            k, q = self.qk[blocks]\n",
     "attention_from_q_and_k or attn_distill_on_cls_rows", "taps.maps(block): q and k swapped (the transposed map)"),
    ("bench/harness.py", 'or "cpp_fused" in e.name', 'or False',
     "bench_harness_counts", "profiled_ops does not count inductor's C++ kernel calls"),
    ("bench/teacher_on_crops.py", "common.build_transform(args, True, args.randaug, args.reprob)",
     "common.build_transform(args, False)", "teacher_on_crops", "teacher_on_crops.py: the views are the whole images"),
    ("bench/reproduce_cifar10.py", '("sskd_tf_cnn", {"ss_weight": 0})', '("sskd_tf_cnn", {"tf_weight": 0})',
     "cpu_long_plan", "cpu_cnn's KD + L_T run switches L_T off instead of L_ss"),
    # ---- #31 / #32, the third session: SDSSL's one loss per view, carried results --------
    ("sdssl.py", "ssl = ssl + per_layer[L - 1]", "ssl = ssl + per_layer[0]",
     "sdssl_target_source or plain_framework", "SD-MoCo v3 / SD-BYOL: L_ssl from the first layer's rows, not the last's"),
    ("bench/reproduce_cifar10.py", 'and before[r.name].get("command") == normalize(r.command(args.nproc), out)}',
     'and before[r.name].get("command") is not None}',
     "cpu_long_plan", "reproduce_cifar10: a result carried from the previous results file whatever its command"),
    # ---- #31, the fourth session: AttnDistill's logsum on logits and its CLS row as a product-sum; SSKD's SS module in fp32
    ("common.py", "scores = (k * (q[..., :1, :] * scale)).sum(-1)", "scores = (k * q[..., :1, :]).sum(-1)",
     "attention_from_q_and_k or attn_distill_logsum", 'taps.maps(rows="cls"): the CLS row without timm\'s 1 / sqrt(d) scale'),
    ("attn_distill.py", 'logits["teacher"] = logits["student"] and grids[0] == grids[1]', 'logits["teacher"] = logits["student"]',
     "attn_distill_logsum", "AttnDistill: a teacher on a finer grid gives logits (resized as if they were probabilities)"),
    ("attn_distill.py", "        return torch.cat([rows[..., :1], rows[..., num_prefix_tokens:]], -1) if num_prefix_tokens > 1 else rows",
     "        return rows", "logsum_on_logits", "AttnDistill: logit rows keep a distillation token's key"),
    ("attn_distill.py", "logs = rows if logits else", "logs = rows.softmax(-1) if logits else",
     "logsum_on_logits or attn_distill_logsum", "AttnDistill: logsum on logits sums the heads' probabilities, not their logs"),
    ("sskd.py", "        with torch.autocast(x.device.type, enabled=False):\n            return self.net(x.float())",
     "        return self.net(x)", "ss_module_runs_in_fp32", "SSKD's SS module under the step's autocast (bf16 weight copies)"),
]


def tracked_files():
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True).stdout
    return [p for p in out.decode().split("\0") if p]


def copy_repo(dest, files):
    for rel in files:
        src = os.path.join(ROOT, rel)
        if not os.path.isfile(src):  # deleted in the work tree, or a submodule
            continue
        os.makedirs(os.path.dirname(os.path.join(dest, rel)) or dest, exist_ok=True)
        shutil.copy2(src, os.path.join(dest, rel))


def run_one(index, mutation, files, timeout, python, k=None):
    path, old, new, expr, what = mutation
    expr = k or expr
    row = {"id": index, "file": path, "tests": expr, "bug": what}
    with open(os.path.join(ROOT, path)) as f:
        text = f.read()
    count = text.count(old)
    if count != 1:
        row.update(status="invalid", detail=f"original text found {count} times", seconds=0.0)
        return row
    tmp = tempfile.mkdtemp(prefix=f"mutate{index:03d}_")
    t0 = time.time()
    try:
        copy_repo(tmp, files)
        with open(os.path.join(tmp, path), "w") as f:
            f.write(text.replace(old, new))
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONDONTWRITEBYTECODE="1")
        cmd = [python, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "test_smoke.py"] + (["-k", expr] if expr != "all" else [])
        try:
            p = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=timeout)
            lines = [l for l in (p.stdout + p.stderr).splitlines() if l.strip()]
            summary = lines[-1] if lines else ""
            if p.returncode == 0:
                row.update(status="survived", detail=summary)
            elif p.returncode == 5:  # no test selected: the -k expression is stale
                row.update(status="invalid", detail=f"no test selected by -k {expr!r}")
            elif p.returncode == 1:
                row.update(status="caught", detail=summary)
            else:  # 2-4: pytest could not run (import error in the mutant counts as caught only if collection failed)
                row.update(status="caught", detail=f"pytest exit {p.returncode}: {summary}")
        except subprocess.TimeoutExpired:
            row.update(status="timeout", detail=f"over {timeout}s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    row["seconds"] = round(time.time() - t0, 1)
    return row


def main(argv=None):
    ap = argparse.ArgumentParser("mutate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", type=int, nargs="+", help="run only these mutation numbers (see --list)")
    ap.add_argument("--list", action="store_true", help="print the mutations and exit")
    ap.add_argument("--jobs", type=int, default=1, help="mutations run in parallel (default 1)")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per mutation (default 300)")
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--python", default=sys.executable, help="interpreter that runs pytest (default: this one)")
    ap.add_argument("--k", default=None, help="run every mutation against this pytest -k expression instead of its own "
                    "('all': the whole suite; 'pinned': the pinned values alone)")
    args = ap.parse_args(argv)
    chosen = list(range(len(MUTATIONS))) if not args.only else args.only
    bad = [i for i in chosen if not 0 <= i < len(MUTATIONS)]
    if bad:
        ap.error(f"--only: no mutation {bad} (0..{len(MUTATIONS) - 1})")
    if args.list:
        for i in chosen:
            path, old, new, expr, what = MUTATIONS[i]
            print(f"{i:3d}  {path:18s} {what}\n     -k {expr}")
        return 0
    files = tracked_files()
    t0 = time.time()
    results = []

    def report(row):
        print(f"{row['id']:3d} {row['status']:8s} {row['seconds']:6.1f}s  {row['file']:18s} {row['bug']}"
              + (f"  [{row['detail']}]" if row["status"] in ("invalid", "timeout") else ""), flush=True)
        results.append(row)

    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        futures = [pool.submit(run_one, i, MUTATIONS[i], files, args.timeout, args.python, args.k) for i in chosen]
        for fut in futures:  # in order
            report(fut.result())
    results.sort(key=lambda r: r["id"])
    counts = {s: sum(r["status"] == s for r in results) for s in ("caught", "timeout", "survived", "invalid")}
    valid = counts["caught"] + counts["timeout"] + counts["survived"]
    caught = counts["caught"] + counts["timeout"]
    pct = 100.0 * caught / valid if valid else 0.0
    print(f"score {caught} / {valid} ({pct:.1f}%)  caught {counts['caught']}, timeout {counts['timeout']}, "
          f"survived {counts['survived']}, invalid {counts['invalid']}; {time.time() - t0:.0f}s")
    for r in results:
        if r["status"] == "survived":
            print(f"  survived {r['id']}: {r['file']}: {r['bug']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"score": {"caught": caught, "valid": valid, "percent": round(pct, 1), **counts},
                       "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
