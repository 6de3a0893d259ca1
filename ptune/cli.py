"""The ``ptune`` command: front ends (chat, web, serve) and model tools (convert, verify, import-ptuning,
export-ptuning)."""

from __future__ import annotations

import argparse
import json
import logging
import sys

FRONT_ENDS = {"chat": "ptune.frontends.chat", "web": "ptune.frontends.web", "serve": "ptune.serve.app"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in FRONT_ENDS:  # Hydra-style key=value overrides, handled by the front end itself
        import importlib

        return importlib.import_module(FRONT_ENDS[argv[0]]).main(argv[1:])
    parser = argparse.ArgumentParser(
        prog="ptune",
        description="ptune: P-tuning v2 tools. Training: train.py; evaluation: evaluate.py. Front ends take "
        "key=value overrides of conf/chat.yaml: ptune chat|web|serve checkpoint=PATH [model.path=...] ...",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name, what in (("chat", "terminal chat"), ("web", "Gradio chat page"), ("serve", "HTTP API")):
        commands.add_parser(name, help=f"{what}: key=value overrides of conf/chat.yaml, e.g. checkpoint=PATH")
    convert = commands.add_parser("convert", help="original ChatGLM2 folder -> native GLM folder (safetensors)")
    convert.add_argument("src", help="the downloaded ChatGLM2-6B folder (config.json, tokenizer.model, *.bin)")
    convert.add_argument("dst", help="where to write the converted model")
    verify = commands.add_parser("verify", help="check a ChatGLM2 download: every tensor by config.json, SHA256")
    verify.add_argument("model_dir")
    imported = commands.add_parser("import-ptuning", help="original P-tuning checkpoint -> ptune checkpoint")
    imported.add_argument("checkpoint", help="e.g. output/adgen-chatglm2-6b-pt-128-2e-2/checkpoint-3000")
    imported.add_argument("--base", required=True, help="the ChatGLM2-6B folder it was trained on")
    imported.add_argument("--out", help="the new ptune checkpoint folder (default: CHECKPOINT-ptune)")
    imported.add_argument("--max-source-length", type=int, default=64, help="prompt tokens kept (reference: 64)")
    imported.add_argument("--max-target-length", type=int, default=128, help="answer tokens (reference: 128)")
    exported = commands.add_parser(
        "export-ptuning",
        help="ptune checkpoint of a ChatGLM2 base -> original P-tuning layout (web_demo.py, chatglm.cpp)",
    )
    exported.add_argument("checkpoint", help="a ptune checkpoint folder, e.g. outputs/DATE/TIME/checkpoint-3000")
    exported.add_argument("out", help="the new folder: pytorch_model.bin (prefix only) and config.json")
    from ptune.training import estimate

    estimate_help = "memory estimate for training a prefix (GiB table): --batch 4 or batch=4"
    estimate.add_arguments(commands.add_parser("estimate", help=estimate_help))
    args = parser.parse_args(estimate.as_options(argv) if argv and argv[0] == "estimate" else argv)
    if args.command == "estimate":
        return estimate.run(args)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from ptune.chatglm2 import conversion as chatglm2
    from ptune.chatglm2 import files as chatglm2_files
    from ptune.checkpoints import original_ptuning

    try:
        if args.command == "convert":
            chatglm2.convert_folder(args.src, args.dst)
            print(f"converted {args.src} -> {args.dst}")
        elif args.command == "verify":
            print("\n".join(chatglm2_files.verify(args.model_dir)))
        elif args.command == "export-ptuning":
            saved = json.loads((original_ptuning.export_ptuning(args.checkpoint, args.out) / "config.json").read_text())
            flags = f"--pre_seq_len {saved['pre_seq_len']}" + (
                " --prefix_projection" if saved["prefix_projection"] else ""
            )
            print(f"wrote {args.out}: web_demo.py --ptuning_checkpoint {args.out} {flags}")
        else:
            out = args.out or f"{args.checkpoint.rstrip('/')}-ptune"
            lengths = args.max_source_length, args.max_target_length
            original_ptuning.import_ptuning(args.checkpoint, args.base, out, *lengths)
            print(f"wrote {out}: evaluate.py checkpoint={out} dataset=advertisegen dataset.dir=...")
    except (FileNotFoundError, FileExistsError, ValueError, NotImplementedError) as err:
        print(f"ptune {args.command}: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
