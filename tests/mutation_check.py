"""Mutation check: each test must catch the bug it is named after.

Every entry of MUTATIONS is a one-line bug planted in a copy of the tree, with the tests that
must fail because of it. For each mutation this script copies the checkout (the files git
knows about, untracked ones included, without ignored build outputs) into a temporary
directory, replaces the exact original snippet (which must occur exactly once, or the
script stops: the mutation list is out of date), runs

    <repo venv python> -m pytest -q -x <the mutation's tests>

in the copy with PYTHONPATH pointing at it, and reports CAUGHT (a named test failed) or
MISSED (they all passed). The exit status is non-zero if any mutation is missed or cannot
be applied. The working tree itself is never modified.

Run it from the repository root (it is not collected by pytest):

    .venv/bin/python -m tests.mutation_check              # every mutation (tens of minutes)
    .venv/bin/python -m tests.mutation_check --only grad-scale-by-batch-shards
    .venv/bin/python -m tests.mutation_check --only topk-merge-order --only topk-shard-offset
    .venv/bin/python -m tests.mutation_check --list       # names, files and tests
    .venv/bin/python -m tests.mutation_check --keep       # keep the mutated copies for a look

`--only` also takes a prefix (`--only topk` runs every top-k mutation).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Mutation:
  name: str
  file: str          # relative to the repository root
  original: str      # exact snippet; must occur exactly once in `file`
  replacement: str
  tests: tuple[str, ...]  # pytest node ids (files or tests) that must catch it
  why: str = ""


MUTATIONS = [
    # (a) A gradient scaled by the number of batch shards (data x fsdp): a psum where a mean
    # was meant. Adam and clipping hide it from the loss and the parameters; grad_norm does not.
    Mutation(
        "grad-scale-by-batch-shards", "prism_jax/step.py",
        "    updates, opt_state = tx.update(grads, state.opt_state, state.params)",
        "    grads = jax.tree.map(lambda g: g * sharding.axis_size(\"batch\"), grads); "
        "updates, opt_state = tx.update(grads, state.opt_state, state.params)",
        ("tests/test_sharded_train.py::test_sharded_training_equals_unsharded",),
        "gradient scale x (data x fsdp) on sharded meshes only"),
    # (a') The same bug with a constant: every mesh agrees, so only a direct gradient sees it.
    Mutation(
        "grad-scale-constant", "prism_jax/step.py",
        "    updates, opt_state = tx.update(grads, state.opt_state, state.params)",
        "    grads = jax.tree.map(lambda g: g * 2.0, grads); "
        "updates, opt_state = tx.update(grads, state.opt_state, state.params)",
        ("tests/test_sharded_train.py::test_train_step_gradient_norm_is_the_loss_gradient",),
        "gradient scale x2 everywhere"),
    # (b) The top-k merge taken in reverse candidate order: the same values win, but ties go
    # to the highest ids instead of the lowest.
    Mutation(
        "topk-merge-order", "prism_jax/models/prism_head.py",
        "    values, order = jax.lax.top_k(values, k)",
        "    merged = values; values, order = jax.lax.top_k(merged[..., ::-1], k); "
        "order = merged.shape[-1] - 1 - order",
        ("tests/test_prism_head.py::test_sharded_top_k_equals_reference_top_k_with_ties",),
        "ties resolved to the highest id in the per-shard merge"),
    # (b') Global ids offset by min(k, shard size) per shard instead of by the shard's size:
    # right only while a shard holds at most k prototypes.
    Mutation(
        "topk-shard-offset", "prism_jax/models/prism_head.py",
        "  indices = indices + shard * m_local",
        "  indices = indices + shard * min(k, m_local)",
        ("tests/test_prism_head.py::test_sharded_top_k_equals_reference_top_k_with_ties",),
        "global id = local id + shard * min(k, shard size) (wrong when a shard holds > k)"),
    # (c) Bits per byte divided by the token count instead of the byte count.
    Mutation(
        "bpb-tokens-not-bytes", "prism_jax/evaluation.py",
        '"bits_per_byte": nats / math.log(2) / max(num_bytes, 1),',
        '"bits_per_byte": nats / math.log(2) / max(tokens, 1),',
        ("tests/test_evaluate.py",),
        "bits per byte computed per token"),
    # (d) The training positions' gradient g_t = E^T p_t - E_{y_t} without its target term.
    Mutation(
        "attribution-missed-y_t", "prism_jax/attribution/index_step.py",
        'records["grad"] = m_BxLxD - jnp.take(e_VxD, batch["targets"], 0)',
        'records["grad"] = m_BxLxD',
        ("tests/test_attribution.py",),
        "g_t = E^T p_t: the - e_{y_t} term dropped from the indexed gradients"),
    # (d') The query's gradient g_q without its target term.
    Mutation(
        "attribution-query-missed-y", "prism_jax/attribution/prototype.py",
        "g = p @ e_VxD - e_VxD[target]",
        "g = p @ e_VxD",
        ("tests/test_attribution.py",),
        "g_q = E^T p_q: the - e_y term dropped from the query gradient"),
    # (e) Resume restores the model but not the data iterator's position.
    Mutation(
        "resume-drops-data-iterator", "prism_jax/checkpoint.py",
        '      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)',
        "      pass",
        ("tests/test_checkpoint_resume.py", "tests/test_reliability.py"),
        "restore() leaves the data iterator at the start"),
    # Recompile guards.
    Mutation(
        "decode-step-recompiles", "prism_jax/sampling.py",
        "self._decode_step = jax.jit(decode_step, donate_argnums=(1,))",
        "self._decode_step = jax.jit(decode_step, donate_argnums=(1,), static_argnums=(3,))",
        ("tests/test_generate.py::test_decode_step_traces_and_compiles_once",),
        "the decode position made static: one compile per generated token"),
    Mutation(
        "train-step-retraces", "prism_jax/step.py",
        "    new_state = TrainState(step=state.step + 1,",
        "    new_state = TrainState(step=(state.step + 1).astype(jnp.int16),",
        ("tests/test_sharded_train.py::test_train_step_traces_and_compiles_once",),
        "the step counter changes dtype, so step 2 retraces"),
    # The eval step on the run's mesh (tests/test_sharded_eval.py).
    Mutation(
        "eval-sum-scaled-by-shards", "prism_jax/step.py",
        '    sums = {"loss_sum": jnp.sum(per_token * mask), "tokens": jnp.sum(mask)}',
        '    sums = {"loss_sum": jnp.sum(per_token * mask) * sharding.axis_size("batch"), '
        '"tokens": jnp.sum(mask)}',
        ("tests/test_sharded_eval.py",),
        "validation loss scaled by the number of batch shards"),
    # No data loss (tests/test_no_data_loss.py, tests/test_bad_input.py).
    Mutation(
        "nonfinite-update-kept", "prism_jax/step.py",
        "    finite = (jnp.isfinite(loss) & jnp.isfinite(grad_norm) & all_finite(params)",
        "    finite = (jnp.isfinite(loss) & jnp.isfinite(grad_norm)",
        ("tests/test_no_data_loss.py::test_a_non_finite_update_is_never_kept",),
        "only loss and gradient checked: a NaN update is kept"),
    Mutation(
        "access-error-sets-aside", "prism_jax/training.py",
        "    except (CheckpointMismatch, CheckpointUnreachable):",
        "    except CheckpointMismatch:",
        ("tests/test_no_data_loss.py::test_permission_error_stops_and_sets_nothing_aside",),
        "a permission error renames good checkpoints .unreadable"),
    Mutation(
        "second-writer-let-in", "prism_jax/outputs.py",
        "      if holder is None or self._stale(holder):",
        "      if True:",
        ("tests/test_no_data_loss.py::test_two_writers_in_one_workdir",),
        "a live holder's lock is taken over"),
    Mutation(
        "oldest-checkpoint-first", "prism_jax/training.py",
        "  for step in sorted(checkpointer.all_steps(), reverse=True):",
        "  for step in sorted(checkpointer.all_steps()):",
        ("tests/test_checkpoint_resume.py",),
        "resumes from the oldest checkpoint"),
    Mutation(
        "ctrl-c-loses-the-steps", "prism_jax/training.py",
        "      if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not ignored",
        "      if False:",
        ("tests/test_reliability.py::test_sigterm_or_ctrl_c_saves_at_that_step_and_exits_0",),
        "Ctrl-C stops without saving the current step"),
    Mutation(
        "damaged-index-file-traceback", "prism_jax/attribution/index.py",
        "      except (OSError, ValueError, EOFError) as e:  # missing, truncated, not an .npy",
        "      except KeyError as e:",
        ("tests/test_no_data_loss.py::test_a_damaged_index_is_one_line_naming_the_file",),
        "a truncated or missing index file is numpy's traceback"),
    Mutation(
        "compare-scores-twice", "prism_jax/comparison.py",
        '  return results if results.get("compare_request") == request else None',
        "  return None",
        ("tests/test_no_data_loss.py::test_compare_resumed_scores_each_run_once",),
        "a resumed compare evaluates a finished run again"),
    Mutation(
        "resume-on-a-wider-validation-split", "prism_jax/cli.py",
        "  for key in DATA_STREAM:",
        "  for key in ():",
        ("tests/test_config.py::test_resuming_on_another_data_stream_is_refused",),
        "a resume under another data stream (a wider validation split) is let through"),
    Mutation(
        "tokenizer-not-checked", "prism_jax/tokenizer_record.py",
        '  if mine is None or record is None or record.get("sha256") == mine:',
        "  if True:",
        ("tests/test_no_data_loss.py::"
         "test_a_run_refuses_a_tokenizer_other_than_the_one_it_trained_with",),
        "a run resumed or read under another tokenizer"),
    Mutation(
        "evaluation-replaces-another", "prism_jax/evaluation.py",
        '  return layout.path(workdir, layout.EVAL, ".".join([f"step_{step}", *tags, "json"]))',
        '  return layout.path(workdir, layout.EVAL, f"step_{step}.json")',
        ("tests/test_evaluate.py::test_each_kind_of_evaluation_keeps_a_file_of_its_own",),
        "a quick or text-file evaluation replaces the step's results"),
    Mutation(
        "index-rebuilt-while-open-mixed", "prism_jax/attribution/index.py",
        "      if self._identity is not None and _build_identity(self.path) != self._identity:",
        "      if False:",
        ("tests/test_no_data_loss.py::"
         "test_an_index_rebuilt_while_open_is_never_read_half_old_half_new",),
        "a reader pairs the old manifest with the new build's files"),
    Mutation(
        "nearest-pair-last-of-ties", "prism_jax/models/head_summary.py",
        "  first = jnp.min(jnp.where(x == low, index, x.shape[axis]), axis=axis)",
        "  first = jnp.max(jnp.where(x == low, index, -1), axis=axis)",
        ("tests/test_head_summary.py::test_min_and_argmin_is_jnp_argmin_ties_included",),
        "the fast argmin picks the last of tied nearest keys, not jnp.argmin's first"),
    Mutation(
        "key-drift-logged-one-step-late", "prism_jax/step.py",
        "      done = state.step + 1",
        "      done = state.step",
        ("tests/test_diagnostics.py::test_key_drift_is_measured_on_the_steps_the_loop_logs",),
        "key drift measured on the step after the logged one: NaN in metrics.jsonl"),
    Mutation(
        "calibration-report-drops-earlier-tasks", "prism_jax/control/records.py",
        '  return {**report, "tasks": {**kept, **report["tasks"]}}',
        "  return report",
        ("tests/test_control.py::test_calibration_report_keeps_the_tasks_not_recalibrated",),
        "calibrating sciq after piqa loses piqa's held-out figures from report.json"),
    Mutation(
        "calibration-report-keeps-a-trained-over-model", "prism_jax/control/records.py",
        '  return other_commit(task.get("checkpoint_saved_ns"), '
        'report.get("checkpoint_saved_ns"))',
        "  return False",
        ("tests/test_control.py::"
         "test_calibration_report_drops_tasks_of_a_checkpoint_trained_over",),
        "report.json keeps the first model's figures beside the retrained one's, same step"),
    Mutation(
        "intervention-of-another-step-silent", "prism_jax/control/records.py",
        "  if made_step != step:",
        "  if False:",
        ("tests/test_control.py::"
         "test_an_intervention_made_on_another_checkpoint_is_applied_with_a_warning",),
        "evaluate --controller from step 500 on step 1000 says nothing of it"),
    Mutation(
        "control-labels-of-another-checkpoint", "prism_jax/control/study.py",
        "    if why is None:",
        "    if True:",
        ("tests/test_explore.py::test_control_shows_the_explorers_labels_only_for_the_"
         "checkpoint_they_describe",),
        "control's report labels prototypes with the labels of a model trained over"),
    Mutation(
        "lds-cache-read-blindly", "prism_jax/attribution/ground_truth.py",
        "  cached = _read_cache(path, _read_group, say)",
        "  cached = _read_group(path) if os.path.exists(path) else None",
        ("tests/test_lds.py::test_retrains_removing_the_driving_example_lower_the_query",),
        "a cut-short retrain cache stops the LDS study with a zip traceback"),
    Mutation(
        "ablate-reuses-runs-of-other-settings", "benchmarks/ablate.py",
        "      why = other_settings(workdir, exp_of(v), run_args(v, seed))",
        "      why = None",
        ("tests/test_ablate.py::test_a_finished_run_of_other_settings_never_stands_in_for_a_"
         "variant",),
        "make ablate with other extra overrides tables the first invocation's runs"),
    Mutation(
        "index-checked-by-step-alone", "prism_jax/attribution/index.py",
        "  if other_commit(built_from, saved_ns):",
        "  if False:",
        ("tests/test_no_data_loss.py::"
         "test_an_index_of_an_earlier_checkpoint_of_the_same_step_is_refused",),
        "attribute reads the first model's index after the run is trained again to its step"),
    Mutation(
        "index-build-ignores-checkpoint-time", "prism_jax/attribution/indexing.py",
        "    build[\"checkpoint_saved_ns\"] = saved_ns",
        "    pass",
        ("tests/test_single_pass.py::test_an_index_of_the_same_build_is_kept_and_a_damaged_or_"
         "other_one_built_again",),
        "make index calls the first model's index up to date after a retrain to the same step"),
    Mutation(
        "compare-reuses-another-checkpoints-evaluation", "prism_jax/comparison.py",
        '               "checkpoint_saved_ns": restore.checkpoint_saved_ns(cfg, run_dir, step)}',
        "               }",
        ("tests/test_no_data_loss.py::test_compare_resumed_scores_each_run_once",),
        "compare's table reports the deleted run's evaluation for the retrained one"),
    Mutation(
        "resume-under-another-seed", "prism_jax/cli.py",
        "  if old != value:  # its initial parameters, the keys key drift is measured from, the label",
        "  if False:",
        ("tests/test_config.py::test_resuming_with_a_different_model_is_refused",),
        "compare ARGS=train.seed=1 in a seed-0 folder scores seed 0's runs as seed 1's"),
    Mutation(
        "index-build-removes-a-users-partial-folder", "prism_jax/attribution/indexing.py",
        "  if work.exists() and not _is_build_folder(work):",
        "  if False:",
        ("tests/test_single_pass.py::"
         "test_a_folder_where_the_build_goes_that_is_not_a_build_is_left_alone",),
        "make index --index X deletes the user's folder X.partial"),
    Mutation(
        "index-resumes-from-a-part-cut-short", "prism_jax/attribution/indexing.py",
        "        if (work / part[\"path\"] / f\"{name}.npy\").stat().length != size:",
        "        if False:",
        ("tests/test_single_pass.py::"
         "test_a_half_built_index_damaged_from_outside_is_built_again",),
        "a half-built index with a part cut short stops in numpy at the end of the pass"),
    Mutation(
        "make-clean-removes-runs", "Makefile",
        "\trm -rf runs/bench .pytest_cache",
        "\trm -rf runs .pytest_cache",
        ("tests/test_no_data_loss.py::test_make_clean_keeps_trained_runs",),
        "make clean deletes every trained run"),
    Mutation(
        "tpu-train-on-the-vms-disk", "launch/tpu.py",
        '  if not (args.workdir or "").startswith("gs://") and not args.workdir_on_vm:',
        "  if False:",
        ("tests/test_launch.py::test_bad_arguments_fail_in_one_line",),
        "launch/tpu.py train puts the run on the VM's disk, which delete removes"),
    Mutation(
        "json-output-replaces-any-file", "prism_jax/outputs.py",
        "  if fmt is not None and path.exists() and not is_record(path, fmt):",
        "  if False:",
        ("tests/test_bad_input.py::test_bad_input_is_one_line_exit_2_and_writes_nothing",),
        "attribute --json RUN/config.json replaces the run's config with a result"),
    Mutation(
        "explore-output-replaces-a-users-page", "prism_jax/explore/explorer.py",
        '  if taken and not labels_lib.is_labels_file(epath.Path(out_dir, "labels.json")):',
        "  if False:",
        ("tests/test_explore.py::test_an_earlier_report_is_replaced_and_only_it",),
        "explore --output DIR replaces the user's own report.html there"),
    Mutation(
        "two-builds-of-one-index", "prism_jax/main/index.py",
        '      folder.parent, "index", file=f".{folder.name}.lock", what=f"--index {out}"):',
        '      folder.parent, "index", file="unused.lock", what=f"--index {out}"):',
        ("tests/test_bad_input.py::test_bad_input_is_one_line_exit_2_and_writes_nothing",),
        "two runs building one --index write its half-built parts at once"),
    Mutation(
        "tool-on-a-damaged-checkpoint-names-no-way-on", "prism_jax/restore.py",
        "    except CheckpointDamaged as e:  # read-only: name the way on, touch nothing",
        "    except ZeroDivisionError as e:",
        ("tests/test_no_data_loss.py::"
         "test_a_tool_reading_a_damaged_latest_checkpoint_names_the_others",),
        "evaluate on a run whose latest checkpoint is damaged prints TensorStore's spec and "
        "no way on"),
]


def _tracked_files() -> list[str]:
  out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                       cwd=REPO, check=True, capture_output=True).stdout
  return [f for f in out.decode().split("\0") if f and os.path.isfile(os.path.join(REPO, f))]


def _copy_tree(dest: str) -> None:
  for rel in _tracked_files():
    target = os.path.join(dest, rel)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    shutil.copy2(os.path.join(REPO, rel), target)


def _apply(root: str, m: Mutation) -> None:
  path = os.path.join(root, m.file)
  with open(path, encoding="utf-8") as f:
    text = f.read()
  count = text.count(m.original)
  if count != 1:
    raise SystemExit(f"mutation {m.name}: the original snippet occurs {count} times in "
                     f"{m.file} (expected exactly once); update MUTATIONS:\n  {m.original!r}")
  with open(path, "w", encoding="utf-8") as f:
    f.write(text.replace(m.original, m.replacement))


def _python() -> str:
  venv = os.path.join(REPO, ".venv", "bin", "python")
  return venv if os.path.exists(venv) else sys.executable


def _env(root: str) -> dict:
  env = dict(os.environ)
  env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
  env["PYTHONDONTWRITEBYTECODE"] = "1"
  return env


def _check_imports_from_copy(root: str) -> None:
  """The copy, not the editable install of the checkout, must be what the tests import."""
  out = subprocess.run([_python(), "-c", "import prism_jax, tests; print(prism_jax.__file__); "
                        "print(tests.__file__)"], cwd=root, env=_env(root), check=True,
                       capture_output=True, text=True).stdout.split()
  if not all(os.path.realpath(p).startswith(os.path.realpath(root)) for p in out):
    raise SystemExit(f"the copy at {root} does not shadow the checkout: imports {out}")


def _failed_tests(output: str) -> list[str]:
  return re.findall(r"^(?:FAILED|ERROR) (\S+)", output, re.M)


def run_one(m: Mutation, keep: bool = False) -> tuple[str, str]:
  root = tempfile.mkdtemp(prefix=f"mutation-{m.name}-")
  try:
    _copy_tree(root)
    _apply(root, m)
    _check_imports_from_copy(root)
    started = time.time()
    proc = subprocess.run([_python(), "-m", "pytest", "-q", "-x",
                           *m.tests], cwd=root, env=_env(root), capture_output=True, text=True)
    seconds = time.time() - started
    output = proc.stdout + proc.stderr
    if proc.returncode == 0:
      return "MISSED", f"{m.name}: MISSED in {seconds:.0f}s, all of {' '.join(m.tests)} passed"
    failed = _failed_tests(output)
    if proc.returncode == 1 and failed:
      errors = [l[1:].strip() for l in output.splitlines() if l.startswith("E ")
                and not re.fullmatch(r"\w*(Error|Exception):?", l[1:].strip())]
      reason = f"\n    {errors[0][:200]}" if errors else ""
      return "CAUGHT", f"{m.name}: CAUGHT in {seconds:.0f}s by {failed[0]}{reason}"
    tail = "\n    ".join(output.strip().splitlines()[-15:])
    return "BROKEN", (f"{m.name}: pytest exited {proc.returncode} without a failed test "
                      f"(collection or usage error?)\n    {tail}")
  finally:
    if keep:
      print(f"  (mutated copy kept at {root})", flush=True)
    else:
      shutil.rmtree(root, ignore_errors=True)


def _selected(only: list[str] | None) -> list[Mutation]:
  if not only:
    return list(MUTATIONS)
  chosen = [m for m in MUTATIONS if any(m.name == o or m.name.startswith(o) for o in only)]
  if not chosen:
    raise SystemExit(f"no mutation matches {only}; known: {', '.join(m.name for m in MUTATIONS)}")
  return chosen


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--only", action="append", help="a mutation name or prefix (repeatable)")
  parser.add_argument("--list", action="store_true", help="list the mutations and exit")
  parser.add_argument("--keep", action="store_true", help="keep the mutated copies")
  args = parser.parse_args(argv)
  mutations = _selected(args.only)
  if args.list:
    for m in mutations:
      print(f"{m.name}\n  {m.file}: {m.why}\n  tests: {' '.join(m.tests)}")
    return 0
  # Fail early, before any test runs, if a snippet has drifted.
  for m in mutations:
    with open(os.path.join(REPO, m.file), encoding="utf-8") as f:
      count = f.read().count(m.original)
    if count != 1:
      raise SystemExit(f"mutation {m.name}: the original snippet occurs {count} times in "
                       f"{m.file} (expected exactly once); update MUTATIONS:\n  {m.original!r}")
  results = []
  for m in mutations:
    print(f"[{m.name}] {m.file}: {m.why}", flush=True)
    verdict, line = run_one(m, keep=args.keep)
    print("  " + line, flush=True)
    results.append((verdict, m.name))
  print("\nsummary:")
  for verdict, name in results:
    print(f"  {verdict:7s} {name}")
  return 0 if all(v == "CAUGHT" for v, _ in results) else 1


if __name__ == "__main__":
  sys.exit(main())
