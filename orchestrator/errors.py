"""Errors the orchestrator tells users about, kept apart from bugs of ours."""

from __future__ import annotations


class SpecError(Exception):
    """Bad input: the pipeline file, an override or a CLI argument. Exit code 2, nothing started.

    Each problem names where it is (a YAML path like ``stages.train.config.lr``), quotes the
    bad value and says what is allowed.
    """

    def __init__(self, problems: list[str] | str, source: str | None = None):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.source = source
        super().__init__(self.render())

    def render(self) -> str:
        head = f"{self.source}: " if self.source else ""
        if len(self.problems) == 1:
            return head + self.problems[0]
        return head + f"{len(self.problems)} problems:\n" + "\n".join(f"  - {p}" for p in self.problems)


class StageError(Exception):
    """A stage's own code raised: carries the user's traceback text, not ours."""

    def __init__(self, stage: str, message: str, traceback: str = "", retryable: bool = True):
        self.stage = stage
        self.message = message
        self.traceback = traceback
        self.retryable = retryable
        super().__init__(f"stage {stage!r}: {message}")

    def __reduce__(self):
        return (StageError, (self.stage, self.message, self.traceback, self.retryable))
