"""`python -m engine generate`: prompts in, streamed text and a JSONL record per prompt out;
bad flags and inputs are one `config error:` line with exit status 2."""

from __future__ import annotations

import json

import pytest

from engine.cli import main


def test_generate_streams_and_writes_records(trained_checkpoint, tmp_path, capsys):
    run = trained_checkpoint("tiny-llama")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        json.dumps({"prompt": "What does the first article say?"}) + "\n" + json.dumps({"prompt": "Hi"}) + "\n"
    )
    out = tmp_path / "out" / "gen.jsonl"
    args = ["generate", str(run), "--prompts", str(prompts), "--max-new-tokens", "6", "--top-k", "20", "--seed", "2"]
    assert main([*args, "--output", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in records] == ["What does the first article say?", "Hi"]
    assert all(len(r["tokens"]) == 6 and r["finished_by"] == "length" for r in records)
    assert records[0]["options"]["greedy"] is False and records[0]["options"]["top_k"] == 20
    stdout = capsys.readouterr().out
    for i, r in enumerate(records):  # each prompt's header, then exactly its text, streamed
        assert f">>> [{i}] {r['prompt']}\n{r['text']}" in stdout
    assert not list(out.parent.glob("*.tmp"))


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--prompt", "", "--no-chat-template"], "prompt 0 is empty"),
        (["--prompt", "x", "--greedy", "--temperature", "0.7"], "--greedy contradicts --temperature"),
        (["--prompt", "x", "--top-p", "1.5"], "top_p=1.5 must be"),
        (["--prompts", "/nonexistent/prompts.txt"], "no such file"),
    ],
    ids=["empty-prompt", "greedy-and-temperature", "top-p", "no-prompts-file"],
)
def test_bad_input_is_one_config_error_line(trained_checkpoint, tmp_path, capsys, extra, words):
    out = tmp_path / "gen.jsonl"
    assert main(["generate", str(trained_checkpoint("tiny-llama")), *extra, "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("config error: ") and words in err[-1], err
    assert not out.exists()


def test_not_a_checkpoint(tmp_path, capsys):
    assert main(["generate", str(tmp_path), "--prompt", "x"]) == 2
    assert "not a complete engine checkpoint" in capsys.readouterr().err
