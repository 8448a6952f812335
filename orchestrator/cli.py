"""The ``orchestrator`` command line. Exit codes: 0 success, 1 a stage failed, 2 bad input."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import sys
from typing import Sequence

from .errors import SpecError

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2

DEFAULT_TRACKING = "sqlite:///mlflow.db"


class _Parser(argparse.ArgumentParser):
    """Bad arguments are one line (which argument, the value, what is allowed) and exit 2; the
    usage is one ``--help`` away."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(EXIT_BAD_INPUT, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


# Argument types: each refuses a bad value with what is allowed (argparse adds the option's name).
def _int_in(low: int, high: int | None = None):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"got {text!r}; expected an integer") from None
        if value < low or (high is not None and value > high):
            allowed = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise argparse.ArgumentTypeError(f"got {value}; must be an integer {allowed}")
        return value
    return parse


def _finite_float(low: float | None = None):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"got {text!r}; expected a number") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"got {text!r}; must be a finite number")
        if low is not None and value < low:
            raise argparse.ArgumentTypeError(f"got {text!r}; must be >= {low:g}")
        return value
    return parse


def _nonempty(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError(f"got {text!r}; must not be empty")
    if "\x00" in text:
        raise argparse.ArgumentTypeError("must not contain NUL characters")
    return text


def _device(text: str) -> str:
    import re

    if not re.fullmatch(r"cpu|cuda(:\d{1,3})?", text):
        raise argparse.ArgumentTypeError(f"got {text!r}; allowed: cpu, cuda, cuda:N")
    if text.startswith("cuda"):
        import torch

        count = torch.cuda.device_count()
        index = int(text.partition(":")[2] or 0)
        if index >= count:
            raise argparse.ArgumentTypeError(f"got {text!r}; this machine has {count} CUDA devices")
    return text


_PORT = _int_in(1, 65535)
_SEED = _int_in(0, 2**63 - 1)


def _default_tracking() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_TRACKING)


def _add_tracking(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tracking-uri", default=None, metavar="URI", type=_nonempty,
                   help="MLflow tracking store holding the runs (default: $MLFLOW_TRACKING_URI or "
                        f"{DEFAULT_TRACKING} in the current directory).")


def _add_verbose(p: argparse.ArgumentParser) -> None:
    p.add_argument("--verbose", action="store_true",
                   help="Stream Ray's and every stage's output to the terminal too (by default they go to the "
                        "run's log folder, printed at the start and in the summary).")


def _add_pipeline_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", metavar="FILE", type=_nonempty, help="Pipeline YAML file.")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", type=_nonempty,
                   help="Override a field of the file, e.g. --set stages.train.retries=5 "
                        "(VALUE is parsed as YAML; repeatable).")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="orchestrator",
        description="Run GenAI pipelines (tokenize, pretrain, fine-tune, RLHF, serve) as DAGs of stages "
                    "on Ray, tracked in MLflow.",
        epilog="Exit codes: 0 success, 1 a stage failed, 2 bad input.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("validate", help="Check a pipeline file and print its plan; runs nothing.",
                       description="Validate FILE (and overrides) and print the plan: stages in order, "
                                   "what they need, resources and cache status.")
    _add_pipeline_args(p)

    p = sub.add_parser("run", help="Run a pipeline.", description="Run FILE: every stage whose needs are done "
                       "starts at once on Ray. Shows a live table of stages; Ctrl-C cancels.")
    _add_pipeline_args(p)
    p.add_argument("--no-cache", action="store_true", help="Rerun every stage even if its outputs are cached.")
    p.add_argument("--address", default=None, metavar="ADDR", type=_nonempty,
                   help='Ray cluster to run on ("auto", "ray://host:10001"); overrides ray.address in FILE.')
    p.add_argument("--plain", action="store_true", help="Print one line per stage transition instead of a live table.")
    _add_verbose(p)
    p.add_argument("--detach", action="store_true",
                   help="Return when the pipeline ends, even if a serve stage is serving (it stops with Ray).")

    p = sub.add_parser("status", help="Show a run's stages (default: the latest run).",
                       description="Show the state of each stage of RUN_ID (the MLflow parent run id).")
    p.add_argument("run_id", nargs="?", metavar="RUN_ID", type=_nonempty)
    p.add_argument("--json", action="store_true", help="Print the run record as JSON.")
    _add_tracking(p)

    p = sub.add_parser("list", help="List recent pipeline runs.", description="List recent pipeline runs.")
    p.add_argument("--limit", type=_int_in(1, 100_000), default=20, help="How many runs to show (default 20; 1 to 100000).")
    _add_tracking(p)

    p = sub.add_parser("resume", help="Continue a failed, cancelled or killed run.",
                       description="Continue RUN_ID: stages that finished are not rerun; the same MLflow "
                                   "parent run continues. If the pipeline file changed (or is gone) since the "
                                   "run started, it says which keys differ and exits 2 unless --spec says "
                                   "which spec to run with.")
    p.add_argument("run_id", metavar="RUN_ID", type=_nonempty)
    p.add_argument("--spec", choices=["recorded", "current"], default=None,
                   help="When the pipeline file differs from the spec the run started with: 'recorded' runs "
                        "the unfinished stages with the spec the run started with; 'current' with the file as "
                        "it is now (finished stages whose fingerprint changes run again, and the run says which).")
    p.add_argument("--address", default=None, metavar="ADDR", type=_nonempty, help="Ray cluster to run on.")
    p.add_argument("--plain", action="store_true", help="Print transitions instead of a live table.")
    _add_verbose(p)
    _add_tracking(p)

    p = sub.add_parser("cancel", help="Cancel a running pipeline run (or a submitted Ray job).",
                       description="Stop RUN_ID: its running stages' Ray tasks and actors are killed; "
                                   "states become CANCELLED. With --address, RUN_ID is a Ray job id from "
                                   "`orchestrator submit`: the job is stopped and its driver cancels the run.")
    p.add_argument("run_id", metavar="RUN_ID", type=_nonempty)
    p.add_argument("--address", default=None, metavar="URL", type=_nonempty,
                   help="Ray dashboard URL (http://HEAD:8265): RUN_ID is then a Ray job id.")
    _add_tracking(p)

    p = sub.add_parser("submit", help="Run a pipeline on a Ray cluster as a Ray job.",
                       description="Submit FILE to the Ray cluster at --address (Ray Jobs API). The working "
                                   "directory travels with the job; the driver runs `orchestrator run FILE "
                                   "--address auto` on the head node. Prints the Ray job id and the MLflow run id.")
    _add_pipeline_args(p)
    p.add_argument("--address", required=True, metavar="URL", type=_nonempty,
                   help="Ray dashboard URL of the cluster, e.g. http://HEAD:8265 (`ray up` prints it).")
    p.add_argument("--no-cache", action="store_true", help="Rerun every stage even if its outputs are cached.")
    p.add_argument("--env", action="append", default=[], metavar="NAME[=VALUE]", type=_nonempty,
                   help="Set an environment variable for the job: NAME passes your value, NAME=VALUE sets one "
                        "(repeatable), e.g. --env MLFLOW_TRACKING_URI.")
    p.add_argument("--working-dir", default=".", metavar="DIR", type=_nonempty,
                   help="Folder shipped to the cluster (default: the current one); FILE must be inside it.")
    p.add_argument("--exclude", action="append", default=[], metavar="PATTERN", type=_nonempty,
                   help="Leave files matching PATTERN (gitignore syntax) out of the shipped folder (repeatable).")
    p.add_argument("--follow", action="store_true",
                   help="Then print the job's logs until it ends; the exit code is the pipeline's.")
    p.add_argument("--wait-run-id", type=_finite_float(0), default=300.0, metavar="SECONDS",
                   help="How long to wait for the driver to print its MLflow run id (default 300; >= 0).")

    p = sub.add_parser("logs", help="Print a submitted Ray job's logs.",
                       description="Print the logs of Ray job JOB_ID (from `orchestrator submit`), following them "
                                   "until the job ends. Exit code 0 if the job succeeded, 1 if not.")
    p.add_argument("job_id", metavar="JOB_ID", type=_nonempty)
    p.add_argument("--address", required=True, metavar="URL", type=_nonempty, help="Ray dashboard URL (http://HEAD:8265).")
    p.add_argument("--no-follow", action="store_true", help="Print the logs so far and return.")

    p = sub.add_parser("ui", help="Open the MLflow UI on the tracking store.",
                       description="Start the MLflow UI on the pipeline's tracking store (127.0.0.1 unless --host).")
    p.add_argument("file", nargs="?", metavar="FILE", type=_nonempty, help="Pipeline file whose tracking store to show.")
    p.add_argument("--host", default="127.0.0.1", type=_nonempty, help="Interface to bind (default 127.0.0.1).")
    p.add_argument("--port", type=_PORT, default=5000, help="Port (default 5000; 1 to 65535).")
    _add_tracking(p)

    p = sub.add_parser("generate", help="Generate text from a checkpoint (or fill [MASK] with an encoder).",
                       description="Print completions of --prompt from CHECKPOINT_OR_RUN (a masked-LM encoder: "
                                   "the --top-k fillings of each mask token, with probabilities): a checkpoint folder, "
                                   "ours or a Hugging Face one (config.json + safetensors + tokenizer.json), local "
                                   "or a storage URI; a pipeline run id (its last stage with a checkpoint) or "
                                   "RUN_ID:STAGE. Sampling options not given come from the checkpoint's "
                                   "generation_config.json.")
    p.add_argument("checkpoint", metavar="CHECKPOINT_OR_RUN", type=_nonempty)
    p.add_argument("--prompt", action="append", required=True, type=_nonempty,
                   help="Prompt text, not empty (repeatable: one batch).")
    _add_sampling_args(p)
    p.add_argument("--device", default=None, type=_device,
                   help="cpu, cuda or cuda:N, a device this machine has (default: cuda when available).")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="Compute in this dtype (default: as the checkpoint stores its weights).")
    _add_tracking(p)

    # allow_abbrev=False: "--api-key KEY" must not pass as an abbreviation of --api-key-file
    p = sub.add_parser("serve", allow_abbrev=False,
                       help="Serve a checkpoint with an OpenAI-compatible API on Ray Serve.",
                       description="Serve CHECKPOINT_OR_RUN (a checkpoint folder, ours or a Hugging Face one, "
                                   "local or a storage URI; a run id; RUN_ID:STAGE) at /v1/completions, "
                                   "/v1/chat/completions, /v1/models and /health until Ctrl-C (an encoder: "
                                   "/v1/embeddings instead of the completions).")
    p.add_argument("checkpoint", metavar="CHECKPOINT_OR_RUN", type=_nonempty)
    p.add_argument("--host", default="127.0.0.1", type=_nonempty, help="Interface to bind (default 127.0.0.1).")
    p.add_argument("--port", type=_PORT, default=8000, help="Port (default 8000; 1 to 65535).")
    p.add_argument("--replicas", type=_int_in(1, 1024), default=1, help="Ray Serve replicas (default 1; 1 to 1024).")
    p.add_argument("--max-batch-size", type=_int_in(1, 4096), default=8,
                   help="Sequences decoded together per replica (default 8; 1 to 4096).")
    p.add_argument("--max-queue", type=_int_in(0, 1_000_000), default=64,
                   help="Requests waiting per replica before 503 (default 64; 0 to 1000000).")
    p.add_argument("--allow-special-tokens", action="store_true",
                   help="Let completion prompts hold the tokenizer's special tokens (default: request text is "
                        "always plain text; in chat only the template's markers are control tokens).")
    p.add_argument("--api-key-file", default=None, metavar="PATH", type=_nonempty,
                   help="Require the bearer key in this file (first line); default: $ORCHESTRATOR_API_KEY; "
                        "neither: open. The key itself is never an argument (ps would show it).")
    p.add_argument("--model-name", default=None, type=_nonempty, help="Model name in the API (default: the folder name).")
    p.add_argument("--pooling", default="mean", choices=["mean", "cls"],
                   help="Encoder checkpoints (/v1/embeddings): mean of the non-padding tokens' last hidden "
                        "states, or the [CLS] token's; L2-normalised (default mean).")
    p.add_argument("--address", default=None, type=_nonempty, help="Ray cluster to deploy on (default: a local Ray).")
    _add_tracking(p)
    return parser


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    # Ranges and combinations are SamplingParams.validate's; here: numbers, finite.
    g.add_argument("--max-tokens", type=_int_in(1), default=None, help="Tokens to generate (default 64).")
    g.add_argument("--temperature", type=_finite_float(), default=None, help="0 = greedy (default 1.0).")
    g.add_argument("--top-k", type=_int_in(0), default=None, help="Sample from the k most likely tokens (0 = off).")
    g.add_argument("--top-p", type=_finite_float(), default=None, help="Nucleus sampling mass in (0, 1] (default 1).")
    g.add_argument("--min-p", type=_finite_float(), default=0.0, help="Drop tokens below min_p x the top probability.")
    g.add_argument("--repetition-penalty", type=_finite_float(), default=None,
                   help="> 1 discourages repeats (1 = off).")
    g.add_argument("--presence-penalty", type=_finite_float(), default=0.0, help="In [-2, 2] (0 = off).")
    g.add_argument("--frequency-penalty", type=_finite_float(), default=0.0, help="In [-2, 2] (0 = off).")
    g.add_argument("--num-beams", type=_int_in(1), default=1, help="Beam search width (1 = no beam search).")
    g.add_argument("--length-penalty", type=_finite_float(), default=1.0, help="Beam score = logprob / length**this.")
    g.add_argument("--n", type=_int_in(1), default=1, help="Completions per prompt.")
    g.add_argument("--stop", action="append", default=[], type=_nonempty, help="Stop string, not empty (repeatable).")
    g.add_argument("--seed", type=_SEED, default=None, help="Same seed, same text (0 to 2**63-1).")
    g.add_argument("--logprobs", action="store_true", help="Print the log-prob of each chosen token.")


# ---------------------------------------------------------------------------------------------


def cmd_validate(args: argparse.Namespace) -> int:
    from .runs import explain_cache, prepare
    from .spec import redact

    prep = prepare(args.file, args.overrides)
    cache = explain_cache(prep)
    print(f"pipeline {prep.pipeline.name!r}: {len(prep.plan.stages)} stages, storage {redact(prep.pipeline.storage)}, "
          f"tracking {redact(prep.pipeline.tracking_uri())}")
    print(f"{'#':>2}  {'stage':<16} {'kind':<10} {'needs':<24} {'resources':<26} cache")
    for i, s in enumerate(prep.plan.stages, 1):
        r = s.resources
        res = f"cpus={r.cpus:g} gpus={r.gpus:g}" + (f" workers={r.workers}" if r.workers else "")
        flag = "" if s.enabled else "  (disabled)"
        status, changed = cache[s.name]
        print(f"{i:>2}  {s.name:<16} {s.kind:<10} {','.join(s.needs) or '-':<24} {res:<26} {status}{flag}")
        for line in changed[:8]:  # what made it a miss
            print(f"{'':>4}changed: {line}")
        if len(changed) > 8:
            print(f"{'':>4}... and {len(changed) - 8} more")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from .runs import exit_code, new_run_logs, prepare, start_run

    prep = prepare(args.file, args.overrides)
    with new_run_logs(prep, quiet=not args.verbose) as logs:  # until serving ends: Serve logs too
        record = start_run(prep, no_cache=args.no_cache, address=args.address, live=False if args.plain else None,
                           logs=logs)
        endpoints = [r.outputs["endpoint"] for r in record.stages.values()
                     if r.kind == "serve" and r.state.done and r.outputs and r.outputs.get("endpoint")]
        if endpoints and not args.detach:
            _serve_until_interrupted(endpoints, logs.out, owns_ray=(args.address or prep.pipeline.ray.address) is None)
    return exit_code(record)


def _serve_until_interrupted(endpoints: list[str], out=None, *, owns_ray: bool) -> None:
    """A serve stage's deployment lives in this driver's Ray: keep it up until Ctrl-C.

    Our own SIGINT handler, as the executor's: Python raises KeyboardInterrupt only where SIGINT
    was not ignored at start, and a process started in the background by a non-interactive
    shell (CI, a test harness) inherits it ignored, so Ctrl-C did nothing."""
    import signal
    import threading

    stop = threading.Event()
    prev = signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        for url in endpoints:
            print(f"serving at {url}/v1 (OpenAI-compatible). Ctrl-C to stop.", file=out or sys.stdout, flush=True)
        while not stop.wait(1.0):
            pass
    finally:
        signal.signal(signal.SIGINT, prev)
    _stop_serving(owns_ray)


def _stop_serving(owns_ray: bool) -> None:
    """On a Ray this process started, Serve's controller, proxy and replicas die with it: stop
    that Ray, in seconds. Serve's graceful shutdown (applications deleted, replicas drained, the
    controller awaited for up to 30 s) took 6-12 s and, once, over a minute. On a cluster shared
    with others, remove Serve and leave the cluster running."""
    import ray

    if owns_ray:
        ray.shutdown()
    else:
        from workers.serving import app as serving

        serving.shutdown()


def cmd_resume(args: argparse.Namespace) -> int:
    from .runs import exit_code, resume_run

    record = resume_run(args.run_id, args.tracking_uri or _default_tracking(), spec=args.spec, address=args.address,
                        live=False if args.plain else None, quiet=not args.verbose)
    return exit_code(record)


def cmd_status(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from rich.console import Console

    from .console import stage_table
    from .runs import latest_run_id, load_record

    uri = args.tracking_uri or _default_tracking()
    run_id = args.run_id or latest_run_id(uri)
    if run_id is None:
        raise SpecError(f"no pipeline runs in {uri}")
    record = load_record(run_id, uri)
    if args.json:
        print(json.dumps(asdict(record), indent=2, default=str))
    else:
        Console(width=None if sys.stdout.isatty() else 140).print(stage_table(record, list(record.stages)))
        for r in record.stages.values():
            if r.error:
                print(f"{r.name}: {r.error}")
    return EXIT_OK


def cmd_list(args: argparse.Namespace) -> int:
    from .runs import list_runs

    rows = list_runs(args.tracking_uri or _default_tracking(), args.limit)
    print(f"{'run id':<34} {'pipeline':<20} {'state':<10} started")
    for r in rows:
        when = dt.datetime.fromtimestamp(r["start"]).strftime("%Y-%m-%d %H:%M:%S")
        print(f"{r['run_id']:<34} {r['pipeline']:<20} {r['state']:<10} {when}")
    return EXIT_OK


def cmd_cancel(args: argparse.Namespace) -> int:
    from .runs import cancel_run

    if args.address:
        from . import jobs

        print(f"job {args.run_id}: {jobs.stop(args.run_id, args.address)}")
        return EXIT_OK
    record = cancel_run(args.run_id, args.tracking_uri or _default_tracking())
    print(f"run {record.run_id}: {record.state.value}")
    return EXIT_OK


def cmd_submit(args: argparse.Namespace) -> int:
    from . import jobs

    sub = jobs.submit(args.file, args.address, overrides=args.overrides, no_cache=args.no_cache,
                      working_dir=args.working_dir, env=args.env, excludes=args.exclude,
                      wait_run_id_s=args.wait_run_id)
    if args.follow:
        status = jobs.follow_logs(sub.job_id, args.address)
        print(f"job {sub.job_id}: {status}")
        return EXIT_OK if status == "SUCCEEDED" else EXIT_FAILED
    return EXIT_OK


def cmd_logs(args: argparse.Namespace) -> int:
    from . import jobs

    status = jobs.follow_logs(args.job_id, args.address, follow=not args.no_follow)
    print(f"job {args.job_id}: {status}")
    return EXIT_OK if status == "SUCCEEDED" or args.no_follow else EXIT_FAILED


def cmd_ui(args: argparse.Namespace) -> int:
    import subprocess

    uri = args.tracking_uri
    if uri is None and args.file:
        from .spec import load_pipeline

        uri = load_pipeline(args.file)[0].tracking_uri()
    uri = uri or _default_tracking()
    print(f"MLflow UI for {uri} at http://{args.host}:{args.port} (Ctrl-C to stop)")
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", args.host, "--port", str(args.port)]
    try:
        return subprocess.call(cmd)
    except KeyboardInterrupt:
        return EXIT_OK


def cmd_generate(args: argparse.Namespace) -> int:
    from workers.checkpoints import open_checkpoint
    from workers.model.sampling import SamplingParams, generate

    from .runs import resolve_checkpoint

    given = {k: v for k, v in dict(
        max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        repetition_penalty=args.repetition_penalty).items() if v is not None}
    fixed = dict(min_p=args.min_p, presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                 n=args.n, num_beams=args.num_beams, length_penalty=args.length_penalty, stop=tuple(args.stop),
                 seed=args.seed, logprobs=args.logprobs)

    def params_for(defaults: dict) -> SamplingParams:
        params = SamplingParams(**{"max_tokens": 64, **defaults, **given, **fixed})
        try:
            params.validate()
        except ValueError as e:
            raise SpecError(str(e).replace("SamplingParams.", "--").replace("_", "-", 1)) from None
        return params

    params_for({})  # bad arguments fail before the checkpoint loads
    ckpt = resolve_checkpoint(args.checkpoint, args.tracking_uri or _default_tracking())
    try:
        import torch

        lm = open_checkpoint(ckpt, device=args.device, dtype=getattr(torch, args.dtype) if args.dtype else None)
    except (FileNotFoundError, ValueError) as e:
        raise SpecError(str(e)) from None
    if not lm.model.config.causal:  # a masked-LM encoder fills its mask tokens instead
        return _fill_masks(args, lm)
    params = params_for(lm.generation.sampling_kwargs())
    params.stop_token_ids = lm.stop_token_ids
    prompts = [lm.tokenizer.encode(p).ids for p in args.prompt]
    for i, ids in enumerate(prompts):
        if len(ids) + params.max_tokens > lm.context:
            raise SpecError(f"--prompt #{i + 1} has {len(ids)} tokens; with --max-tokens {params.max_tokens} it "
                            f"exceeds the model's context of {lm.context} tokens")
    outs = generate(lm.model, prompts, params, eos_token_id=lm.eos_token_id,
                    decode=lambda t: lm.tokenizer.decode(t, skip_special_tokens=False), device=args.device)
    for prompt, completions in zip(args.prompt, outs):
        for j, c in enumerate(completions):
            head = f"--- prompt {prompt!r}" + (f" [{j}]" if len(completions) > 1 else "")
            score = f" score={c.score:.3f}" if c.score is not None else ""
            print(f"{head} ({c.finish_reason}, {len(c.token_ids)} tokens, logprob={c.cumulative_logprob:.3f}{score})")
            print(prompt + c.text)
            if args.logprobs and c.logprobs:
                print("logprobs:", " ".join(f"{lp:.3f}" for lp in c.logprobs))
    return EXIT_OK


def _check_checkpoint(ckpt: str, **kw) -> None:
    from workers.checkpoints import check_checkpoint

    try:
        check_checkpoint(ckpt, **kw)
    except (FileNotFoundError, ValueError) as e:
        raise SpecError(str(e)) from None


def _fill_masks(args: argparse.Namespace, lm) -> int:
    """`generate` on a masked-LM checkpoint: each mask token of each --prompt, its --top-k (default
    5) fillings with their probabilities."""
    from workers.model.fill_mask import fill_mask

    mask = lm.tokenizer_config.get("mask_token")
    mask = mask.get("content") if isinstance(mask, dict) else mask
    mask_id = lm.tokenizer.token_to_id(mask) if isinstance(mask, str) else None
    if mask_id is None:
        raise SpecError(f"checkpoint {lm.uri!r} is a masked-LM encoder but its tokenizer_config.json names no "
                        "mask_token known to its tokenizer")
    for i, prompt in enumerate(args.prompt):
        ids = lm.tokenizer.encode(prompt).ids
        if len(ids) > lm.model.max_length:
            raise SpecError(f"--prompt #{i + 1} has {len(ids)} tokens; the model takes at most {lm.model.max_length}")
        fills = fill_mask(lm.model, ids, mask_id, top_k=args.top_k or 5)
        if not fills:
            raise SpecError(f"--prompt #{i + 1} holds no {mask} token; a masked-LM encoder fills masks "
                            f"(e.g. --prompt 'the {mask} of it')")
        print(f"--- prompt {prompt!r} ({len(fills)} mask{'s' if len(fills) > 1 else ''})")
        for m, top in enumerate(fills):
            for rank, (tid, p) in enumerate(top):
                print(f"mask {m} #{rank + 1}: {lm.tokenizer.decode([tid])!r} id={tid} p={p:.6f}")
    return EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    from workers.serving import app as serving

    from .runs import connect_ray, resolve_checkpoint
    from .spec import RayOptions

    ckpt = resolve_checkpoint(args.checkpoint, args.tracking_uri or _default_tracking())
    _check_checkpoint(ckpt, memory=args.address is None)  # before Ray and Serve start: one line, exit 2
    try:
        api_key = serving.api_key_from(file=args.api_key_file) if args.api_key_file else \
            os.environ.get("ORCHESTRATOR_API_KEY", "").strip() or None
    except (OSError, ValueError) as e:
        raise SpecError(f"--api-key-file: {e}") from None
    # Without --address, a Ray of our own, as `run` starts one: a bare ray.init() joins the
    # `ray start` cluster last started on this machine (someone else's), where serve_checkpoint's
    # ray.init options are refused.
    connect_ray(RayOptions(address=args.address), helpers_at_normal_priority=True)
    owns_ray = args.address is None
    try:
        url = serving.serve_checkpoint(ckpt, host=args.host, port=args.port, replicas=args.replicas,
                                       max_batch_size=args.max_batch_size, max_queue=args.max_queue,
                                       allow_special_tokens=args.allow_special_tokens,
                                       api_key=api_key, pooling=args.pooling,
                                       model_name=args.model_name, blocking=False)
    except KeyboardInterrupt:  # Ctrl-C while deploying: leave nothing half-deployed
        _stop_serving(owns_ray)
        return EXIT_OK
    print(f"checkpoint {ckpt}", flush=True)
    _serve_until_interrupted([url], owns_ray=owns_ray)
    return EXIT_OK


COMMANDS = {"generate": cmd_generate, "serve": cmd_serve, "validate": cmd_validate, "run": cmd_run, "resume": cmd_resume, "status": cmd_status,
            "list": cmd_list, "cancel": cmd_cancel, "ui": cmd_ui, "submit": cmd_submit, "logs": cmd_logs}


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, or a bad argument (one line said): the code, as a return value
        return e.code if isinstance(e.code, int) else EXIT_BAD_INPUT
    try:
        return COMMANDS[args.command](args)
    except SpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
