"""Command line: python -m corgi run --image PATH [--image PATH ...] --question TEXT [--followup TEXT ...]

Prints each phase live as the model produces it; with --json, stdout is exactly one JSON
object (live text then goes to stderr only with --verbose). Bad input exits 2 with one line.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from .engine.tiny import TINY_NAMES
from .types import (AnswerReady, EvidenceReady, PhaseFinished, PhaseStarted, StepsParsed, StepStreamed,
                    TextDelta, TurnFinished)

EXIT_BAD_INPUT = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m corgi", description="CoRGI grounded visual reasoning")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="answer questions about one image")
    run.add_argument("--image", required=True, action="append",
                     help="image file (anything Pillow opens); repeat for several views of the first question")
    run.add_argument("--question", required=True)
    run.add_argument("--followup", action="append", default=[], help="a follow-up question (repeatable)")
    run.add_argument("--config", help="YAML config file (default: configs/default.yaml settings)")
    run.add_argument("--model", help=f"model id: a hub id, a local folder, or a random-weight twin "
                                     f"({', '.join(TINY_NAMES)}); with --backend openai the served model's name")
    run.add_argument("--backend", choices=("local", "openai"),
                     help="local: load the model here; openai: use an OpenAI-compatible server (vLLM, SGLang)")
    run.add_argument("--base-url", help="with --backend openai: the server's API root, e.g. http://127.0.0.1:8000/v1")
    run.add_argument("--family", help="with --backend openai: the served model's family (default: from its name)")
    run.add_argument("--json", action="store_true", help="print one JSON object with every turn")
    run.add_argument("--no-cache", action="store_true", help="re-encode and re-read everything per phase")
    run.add_argument("--plain-answer", action="store_true",
                     help="also answer each question plainly (one phase from the same warm prefix), for comparison")
    run.add_argument("--no-jump-forward", action="store_true",
                     help="one model step per token even where the grammar forces the text")
    run.add_argument("--no-prompt-lookup", action="store_true",
                     help="no prompt-lookup drafts (greedy output is the same either way)")
    run.add_argument("--verbose", action="store_true", help="with --json, stream the phases to stderr")
    return parser


class _Printer:
    """Live, human-readable rendering of the event stream."""

    def __init__(self, out):
        self.out = out

    def __call__(self, event) -> None:
        w = self.out.write
        if isinstance(event, PhaseStarted):
            w(f"\n== {event.phase.value} ==\n")
        elif isinstance(event, TextDelta) and event.region is None:
            w(event.text)
        elif isinstance(event, PhaseFinished):
            w(f"\n-- {event.phase.value}: {event.seconds:.2f} s\n")
        elif isinstance(event, StepsParsed):
            for step in event.result.steps:
                box = f" box={step.bbox.to_list()}" if step.bbox else ""
                w(f"  S{step.index} [{step.kind.value}] {step.statement}{box}\n")
        elif isinstance(event, EvidenceReady):
            e = event.evidence
            w(f"  region {event.region + 1}/{event.total} (S{e.step_index}, {e.kind.value}, "
              f"image {e.bbox.image + 1}): {e.text}\n")
        elif isinstance(event, StepStreamed):
            step = event.step
            box = f" box={step.bbox.to_list()}" if step.bbox else ""
            w(f"\n  [step {step.index}, {step.kind.value}] {step.statement}{box}\n")
        elif isinstance(event, AnswerReady):
            w(f"\nAnswer: {event.result.answer}\n")
            if event.result.explanation:
                w(f"Why: {event.result.explanation}\n")
        self.out.flush()


def run(args: argparse.Namespace) -> int:
    # Everything a user can get wrong is checked before torch is imported (seconds): bad input
    # is answered at once.
    from .config import ConfigError, load_config
    from .engine.model_source import ModelLoadError, model_source
    from .images import ImageError, load_image
    from .prompts import InputError, clean_question

    overrides = {}
    if args.model:
        overrides["model.id"] = args.model
    for key, value in (("backend", args.backend), ("base_url", args.base_url), ("family", args.family)):
        if value is not None:
            overrides[f"model.{key}"] = value
    if args.no_cache:
        overrides["cache.enabled"] = False
    if args.plain_answer:
        overrides["pipeline.plain_answer"] = True
    if args.no_jump_forward:
        overrides["pipeline.jump_forward"] = False
    if args.no_prompt_lookup:
        overrides["pipeline.prompt_lookup"] = False
    try:
        config = load_config(args.config, overrides)
        for q in [args.question, *args.followup]:
            clean_question(q, config.pipeline.max_question_chars)
        images = [load_image(path, config.image.max_input_pixels, max_file_mb=config.image.max_file_mb,
                             max_kept_pixels=config.image.max_kept_pixels) for path in args.image]
        if config.model.backend == "local":
            model_source(config.model.id)
    except (ConfigError, ImageError, InputError, ModelLoadError) as exc:
        return _bad_input(exc)

    from .pipeline import ChatSession
    from .remote import RemoteError
    try:
        backend = load_backend(config)
    except (ModelLoadError, RemoteError, ValueError) as exc:
        return _bad_input(exc)

    printer = _Printer(sys.stderr if args.json else sys.stdout) if (args.verbose or not args.json) else None
    try:
        session = ChatSession(backend, images)
    except InputError as exc:
        return _bad_input(exc)
    turns = []
    for question in [args.question, *args.followup]:
        try:
            for event in session.ask(question):
                if printer:
                    printer(event)
                if isinstance(event, TurnFinished):
                    turns.append(event.result.to_json())
        except RemoteError as exc:      # the server went away mid-run: one line
            sys.stderr.write(f"error: {exc}\n")
            return 1
    if args.json:
        payload = {"model": backend.model_info(), "turns": turns}
        sys.stdout.write(json.dumps(payload, ensure_ascii=False) + "\n")
    return 0


def load_backend(config):
    """The backend `model.backend` names: the model loaded here, or a server checked once
    (reachable, key accepted, model served). Raises ModelLoadError, RemoteError, or ValueError
    (UnknownFamily) with one line."""
    if config.model.backend == "openai":
        from .remote import RemoteBackend
        backend = RemoteBackend(config)
        backend.check()
        return backend
    from .engine.engine import Engine
    from .local import LocalBackend
    return LocalBackend(Engine.load(config))


def _bad_input(exc: Exception) -> int:
    sys.stderr.write(f"error: {exc}\n")
    return EXIT_BAD_INPUT


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130
    except Exception as exc:  # a model failure: one line, the traceback only on request
        if os.environ.get("CORGI_DEBUG"):
            raise
        sys.stderr.write(f"error: {type(exc).__name__}: {exc}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
