"""Functions for pipelines/hello.yaml: a tiny word-count pipeline with no dependencies."""

import collections
import json
import sysconfig
from pathlib import Path


def prepare(ctx, n: int = 10):
    """Pick the first n stdlib modules' docstrings as a toy corpus."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(stdlib.glob("*.py"))[:n]
    text = "\n".join(f.read_text(errors="replace")[:2000] for f in files)
    (ctx.artifact_dir / "corpus.txt").write_text(text)
    ctx.log_metrics({"files": len(files), "bytes": len(text)})
    return {"corpus": f"{ctx.output_uri}/corpus.txt", "files": len(files)}


def count(ctx, top: int = 5):
    corpus = Path(ctx.inputs["prepare"]["corpus"]).read_text()
    words = collections.Counter(w for w in corpus.split() if w.isidentifier())
    for step, (w, c) in enumerate(words.most_common(top)):
        ctx.log_metrics({"count": c}, step=step)
    (ctx.artifact_dir / "counts.json").write_text(json.dumps(words.most_common(top)))
    return {"top": words.most_common(top)}
