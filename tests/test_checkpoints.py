"""Bring your own model: Hugging Face folders written by `transformers` through every entry point.

One module fixture writes two tiny random models with their tokenizers (a `tokenizers` BPE wrapped
in ``PreTrainedTokenizerFast`` with a chat template, saved by ``save_pretrained``):

- ``llama``: ``LlamaForCausalLM``, grouped-query attention, bf16, sharded safetensors, a BOS
  post-processor, ``generation_config.json`` with two eos ids and greedy decoding;
- ``qwen2``: ``Qwen2ForCausalLM`` (qkv biases, tied embeddings), fp32, ChatML template.

``orchestrator generate`` (a real subprocess) must print transformers' greedy text; ``orchestrator
serve`` (one real subprocess, its own Ray) answers the official ``openai`` client, rendering the
folder's chat template as transformers does; a LoRA finetune stage starting
from each folder writes a checkpoint ``AutoModelForCausalLM`` and ``AutoTokenizer`` load with the
same family and chat template. Unit tests: ``open_checkpoint`` (the tokenizer side, a remote S3
folder leaving no temporary folder) and ``StageContext.upstream``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from workers.checkpoints import open_checkpoint
from workers.stage import Resources, local_context

TEXT = ("the quick brown fox jumps over the lazy dog. hello world, how are you today? "
        "def add(a, b): return a + b. a list is a sequence; a dict maps keys to values. ") * 8
LLAMA_TEMPLATE = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}</s>{% endfor %}"
                  "{% if add_generation_prompt %}[assistant] {% endif %}")
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]
ROOT = Path(__file__).resolve().parents[1]


def _tokenizer(bos: bool):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if bos:  # as Llama's tokenizer: BOS before every encoded text
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return tok


def write_llama(folder: Path) -> None:
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=_tokenizer(bos=True), bos_token="<s>", eos_token="</s>",
                                  clean_up_tokenization_spaces=False)
    tok.chat_template = LLAMA_TEMPLATE
    tok.save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         initializer_range=0.1, bos_token_id=0, eos_token_id=1)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.generation_config = GenerationConfig(bos_token_id=0, eos_token_id=[1, 3], do_sample=False)
    model.save_pretrained(folder, max_shard_size="60KB")


def write_qwen2(folder: Path) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM, PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=_tokenizer(bos=False), eos_token="<|im_end|>",
                                  pad_token="</s>", clean_up_tokenization_spaces=False)
    tok.chat_template = CHATML
    tok.save_pretrained(folder)
    torch.manual_seed(1)
    config = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         initializer_range=0.1, tie_word_embeddings=True, eos_token_id=3)
    Qwen2ForCausalLM(config).save_pretrained(folder)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    root = tmp_path_factory.mktemp("byom")
    out = {"llama": root / "tiny-llama", "qwen2": root / "tiny-qwen2"}
    write_llama(out["llama"])
    write_qwen2(out["qwen2"])
    return out


def hf_greedy(folder: Path, text: str, max_new_tokens: int, *, chat: bool = False) -> str:
    """transformers' own greedy completion (fp32 compute from the stored weights), stop token dropped."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    if chat:
        ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tok(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=0)
    new = out[0, ids.size(1):].tolist()
    stops = model.generation_config.eos_token_id
    stops = set(stops if isinstance(stops, list) else [stops])
    if new and new[-1] in stops:
        new = new[:-1]
    return tok.decode(new, skip_special_tokens=False)


# ----------------------------------------------------------------------------- open_checkpoint


def test_open_reads_the_tokenizer_side_as_transformers_does(folders):
    from transformers import AutoTokenizer

    llama = open_checkpoint(folders["llama"], device="cpu")
    assert (folders["llama"] / "model.safetensors.index.json").exists()
    assert {p.dtype for p in llama.model.parameters()} == {torch.bfloat16}  # as stored
    assert llama.chat_template == LLAMA_TEMPLATE and llama.context == 128
    assert (llama.bos_token, llama.eos_token, llama.bos_token_id, llama.eos_token_id) == ("<s>", "</s>", 0, 1)
    assert llama.stop_token_ids == (1, 3)  # config.json + generation_config.json
    assert llama.generation.sampling_kwargs() == {"temperature": 0.0}  # do_sample: false
    hf = AutoTokenizer.from_pretrained(folders["llama"])
    assert llama.tokenizer.encode("hello world").ids == hf("hello world")["input_ids"]

    qwen = open_checkpoint(folders["qwen2"], dtype=torch.float32, device="cpu", load=None)
    assert qwen.model is None and qwen.chat_template == CHATML
    assert (qwen.eos_token, qwen.eos_token_id, qwen.pad_token, qwen.stop_token_ids) == ("<|im_end|>", 3, "</s>", (3,))
    assert qwen.format_prompt("hi") == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"

    with pytest.raises(ValueError, match=r"policy: got '/nowhere'; no config.json there"):
        open_checkpoint("/nowhere", field="policy")


def test_a_written_tokenizer_side_loads_in_auto_tokenizer(folders, tmp_path):
    from transformers import AutoTokenizer

    qwen = open_checkpoint(folders["qwen2"], load=None)
    qwen.write_tokenizer(tmp_path, chat_template="{{ messages[0]['content'] }}")
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert tok.chat_template == "{{ messages[0]['content'] }}" and tok.eos_token == "<|im_end|>"
    assert json.loads((tmp_path / "generation_config.json").read_text())["eos_token_id"] == [3]
    assert "chat_template" not in json.loads((tmp_path / "tokenizer_config.json").read_text())


def test_remote_checkpoint_leaves_no_temporary_folder(folders, tmp_path, monkeypatch):
    from tests.conftest import moto_s3
    from workers import storage

    local = open_checkpoint(folders["qwen2"], device="cpu")
    with moto_s3("models"):  # (its credentials file lives in the real temp folder)
        monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
        (tmp_path / "tmp").mkdir()
        storage.publish_dir(folders["qwen2"], "s3://models/tiny-qwen2")
        remote = open_checkpoint("s3://models/tiny-qwen2", device="cpu")
        assert list((tmp_path / "tmp").iterdir()) == []  # downloaded, loaded, removed
        assert remote.local_dir is None and remote.name == "tiny-qwen2" and remote.chat_template == CHATML
        idx = torch.randint(0, 300, (1, 12))
        with torch.no_grad():
            assert torch.equal(remote.model(idx)[0], local.model(idx)[0])
        cached = open_checkpoint("s3://models/tiny-qwen2", load=None, cache_dir=tmp_path / "cache")
        assert cached.local_dir == tmp_path / "cache" and (tmp_path / "cache" / "model.safetensors").is_file()


# ----------------------------------------------------------------------------- the upstream lookup


def test_upstream_takes_a_stage_output_or_a_path(tmp_path, monkeypatch):
    ctx = local_context(tmp_path, "ft", inputs={"pre": {"checkpoint": "/ck/pre", "dataset": "/ds"},
                                                "tok": {"dataset": "/ds2"}})
    assert ctx.upstream("checkpoint", field="checkpoint") == "/ck/pre"  # the only one with it
    assert ctx.upstream("dataset", "tok", field="data") == "/ds2"
    assert ctx.upstream("checkpoint", str(tmp_path), field="checkpoint") == str(tmp_path)  # a path
    monkeypatch.chdir(tmp_path)  # a relative path comes back absolute (workers run elsewhere)
    assert ctx.upstream("checkpoint", "./ft", field="checkpoint") == str(tmp_path / "ft")
    assert ctx.upstream("data", "builtin:x", field="data", check_path=False) == "builtin:x"
    with pytest.raises(ValueError, match=r"data: not set and stage 'ft' has 2 upstreams with a `dataset` output "
                                         r"\(\['pre', 'tok'\]\)"):
        ctx.upstream("dataset", field="data")
    with pytest.raises(ValueError, match=r"policy: upstream 'tok' has no `checkpoint` output \(its outputs: "
                                         r"\['dataset'\]\)"):
        ctx.upstream("checkpoint", "tok", field="policy")
    with pytest.raises(ValueError, match=r"policy: got 'nope'; neither an upstream of stage 'ft' \(upstreams: "
                                         r"\['pre', 'tok'\]\) nor an existing path"):
        ctx.upstream("checkpoint", "nope", field="policy")


# ----------------------------------------------------------------------------- orchestrator generate


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_cli_generate_gives_transformers_greedy_text(folders, family):
    prompt = "hello world, how"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = subprocess.run([sys.executable, "-m", "orchestrator.cli", "generate", str(folders[family]), "--prompt",
                          prompt, "--temperature", "0", "--max-tokens", "16", "--device", "cpu", "--dtype",
                          "float32"], capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert prompt + hf_greedy(folders[family], prompt, 16) in out.stdout.splitlines()


# ----------------------------------------------------------------------------- orchestrator serve (one start)


@pytest.fixture(scope="module")
def served(folders, tmp_path_factory):
    """`orchestrator serve` on the bf16 sharded Llama folder, as a user runs it (its own local Ray),
    in its own process group. Yields (url, process, log); the last test stops it with Ctrl-C."""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "serve", str(folders["llama"]), "--port",
                                 str(port), "--max-batch-size", "2"], stdout=out, stderr=subprocess.STDOUT, env=env,
                                cwd=ROOT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        # no event to await across processes: poll until it says it serves (deployed and healthy)
        while "serving at" not in log.read_text():
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        yield url, proc, log
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.mark.slow
@torch.no_grad()
def test_orchestrator_serve_answers_the_openai_client(served, folders):
    import openai

    url, _, _ = served
    from transformers import AutoTokenizer

    from workers.model.sampling import SamplingParams, generate

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    assert [m.id for m in client.models.list().data] == ["tiny-llama"]
    done = client.completions.create(model="tiny-llama", prompt="the quick", max_tokens=8, temperature=0)
    assert done.usage.completion_tokens >= 1 and done.choices[0].finish_reason in ("stop", "length")
    # the chat prompt is the folder's chat_template.jinja rendered as transformers renders it
    chat = client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "hello"}],
                                          max_tokens=10, temperature=0)
    ids = AutoTokenizer.from_pretrained(folders["llama"]).apply_chat_template(
        [{"role": "user", "content": "hello"}], add_generation_prompt=True, return_dict=True)["input_ids"]
    ck = open_checkpoint(folders["llama"], device="cpu")  # the same bf16 weights, in this process
    want = generate(ck.model, [ids], SamplingParams(max_tokens=10, temperature=0), eos_token_id=ck.eos_token_id,
                    decode=ck.tokenizer.decode)[0][0]
    assert chat.choices[0].message.content == want.text
    assert chat.usage.prompt_tokens == len(ids)


@pytest.mark.slow
def test_ctrl_c_stops_orchestrator_serve_and_its_ray(served):
    """A user's Ctrl-C ends `orchestrator serve` with exit 0 and takes its local Ray (every process
    it started: GCS, raylet, Serve's controller, proxy and replica) with it. The bound only
    catches a hang: Serve's graceful shutdown once made this take a minute."""
    _, proc, log = served
    assert proc.poll() is None, log.read_text()[-3000:]
    proc.send_signal(signal.SIGINT)
    try:
        assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]
    except subprocess.TimeoutExpired:
        pytest.fail(f"`orchestrator serve` still running 60 s after Ctrl-C:\n{log.read_text()[-3000:]}")
    deadline = time.monotonic() + 30
    while True:  # its process group (its Ray's processes too) empties
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        assert time.monotonic() < deadline, subprocess.run(["ps", "-o", "pid,args", "-g", str(proc.pid)],
                                                           capture_output=True, text=True).stdout
        time.sleep(0.2)


# ----------------------------------------------------------------------------- a LoRA finetune stage


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_lora_finetune_from_the_folder_writes_what_transformers_loads(ray_session, folders, tmp_path, family):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workers.data import records as sft_data
    from workers.kinds import finetune

    data = sft_data.write_jsonl(tmp_path / "sft.jsonl", sft_data.synthetic_sft(24, seed=1))
    ctx = local_context(tmp_path, "finetune", resources=Resources(cpus=1, workers=1))
    cfg = finetune.Config(checkpoint=str(folders[family]), data=data, lora={"rank": 4}, max_steps=2, batch_size=4,
                          warmup_steps=0, eval_steps=1, eval_every=2, checkpoint_every=2)
    out = finetune.run(ctx, cfg)
    folder = Path(out["checkpoint"])
    model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto")
    assert model.config.model_type == family
    assert model.dtype == (torch.bfloat16 if family == "llama" else torch.float32)  # the base's stored dtype
    tok = AutoTokenizer.from_pretrained(folder)
    template = LLAMA_TEMPLATE if family == "llama" else CHATML
    assert tok.chat_template == template
    assert tok("hello")["input_ids"] == AutoTokenizer.from_pretrained(folders[family])("hello")["input_ids"]
    again = open_checkpoint(folder, load=None)
    assert again.stop_token_ids[0] == open_checkpoint(folders[family], load=None).eos_token_id


@torch.no_grad()
def test_reward_head_on_a_llama_trunk_round_trips(folders, tmp_path):
    from transformers import AutoModelForCausalLM

    from workers.model.reward_head import save_reward_model

    fresh = open_checkpoint(folders["llama"], load="reward", device="cpu", dtype=torch.float32)
    assert not fresh.is_reward_model
    idx = torch.randint(0, 300, (3, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(idx)
    mask[2, :4] = 0  # left padding
    scores = fresh.model.score(idx, mask)
    save_reward_model(fresh.model, tmp_path / "rm", extra=fresh.carried_config())
    fresh.write_tokenizer(tmp_path / "rm")
    again = open_checkpoint(tmp_path / "rm", load="reward", device="cpu")
    assert again.is_reward_model and torch.equal(again.model.score(idx, mask), scores)
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "rm").config.model_type == "llama"
