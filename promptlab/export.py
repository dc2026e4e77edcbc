"""Taking learned prompts out: export directories, nearest-token reading (and the CoOp import's old name).

An export is a directory in the style of PEFT adapters: the learned tensors only, in
``prompts.safetensors``, beside a ``prompt_config.json`` that names the method, its keyword
arguments, the class names and the backbone (architecture, pretrained tag, weights fingerprint),
so that :func:`load_prompts` can rebuild the module on the same frozen CLIP. When the method's text
features do not depend on the image, ``class_embeddings.safetensors`` also holds the ``[C, D]``
normalised classifier, which anyone can use without promptlab::

    from safetensors.torch import load_file
    W = load_file("prompts/class_embeddings.safetensors")["class_embeddings"]  # [C, D]
    logits = logit_scale * F.normalize(image_features, dim=-1) @ W.T

The JSON records the SHA-256 of each tensor file and is written last, so an export whose files do
not match it (an interrupted save, files copied from two exports) is refused instead of loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import promptlab
from promptlab import io
from promptlab.clip import FrozenCLIP
from promptlab.config import ConfigError, resolve_component
from promptlab.methods import METHODS, CoOp, method_name
from promptlab.prompts import PromptModule

log = logging.getLogger(__name__)

__all__ = [
    "CONFIG_FILE",
    "CLASS_EMBEDDINGS_FILE",
    "TENSORS_FILE",
    "format_interpretation",
    "import_coop_checkpoint",
    "interpret",
    "load_prompts",
    "read_prompt_config",
    "save_prompts",
]

CONFIG_FILE = "prompt_config.json"
TENSORS_FILE = "prompts.safetensors"
CLASS_EMBEDDINGS_FILE = "class_embeddings.safetensors"
#: Bumped when the layout changes incompatibly; load_prompts refuses newer formats.
FORMAT_VERSION = 1

# Keys save_prompts owns; `extra` may not overwrite them (they are what load_prompts trusts).
_RESERVED = (
    "component",
    "format_version",
    "method",
    "hparams",
    "classnames",
    "arch",
    "pretrained",
    "fingerprint",
    "precision",
    "width",
    "embed_dim",
    "promptlab_version",
    "tensors",
    "files",
    "class_embeddings",
    "logit_scale",
)


# ---------------------------------------------------------------------- export
def save_prompts(module: PromptModule, out_dir: str | Path, *, extra: dict | None = None) -> Path:
    """Write a prompt export directory: learned tensors, a JSON config and the class embeddings.

    Args:
        module: the trained prompt module.
        out_dir: the export directory (created if needed). Files of a previous export in it are
            replaced only once every new file is written; other files in it are left alone.
        extra: more JSON-serialisable entries for ``prompt_config.json`` (run name, metrics, ...);
            they may not overwrite the keys this function writes.

    Returns:
        The path of ``prompt_config.json``.

    Raises:
        ValueError: ``extra`` collides with a reserved key.
        TypeError: an hparam or ``extra`` value is not JSON-serialisable.
    """
    out_dir = Path(out_dir)
    extra = dict(extra or {})
    clash = sorted(set(extra) & set(_RESERVED))
    if clash:
        raise ValueError(f"save_prompts(extra=...): keys {clash} are reserved for the export itself")
    clip = module.clip
    method = method_name(module)

    # Learned tensors only (no backbone weights, no class-derived buffers), floating point as fp32
    # so an export does not depend on the precision it was trained in.
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in module.prompt_state_dict().items()}
    meta = {"format": "pt", "method": method, "promptlab_version": promptlab.__version__}
    blobs: dict[str, bytes] = {TENSORS_FILE: io.safetensors_bytes(state, meta)}

    config: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "method": method,
        "component": component_path(module),  # how to rebuild a method that is not in METHODS
        "hparams": _jsonable_hparams(module),
        "classnames": list(module.classnames),
        "arch": clip.arch,
        "pretrained": clip.pretrained,
        "fingerprint": clip.fingerprint(),
        "precision": clip.precision,  # load_clip's precision: the arithmetic the prompts were learned in
        "width": clip.width,
        "embed_dim": clip.embed_dim,
        "promptlab_version": promptlab.__version__,
        "tensors": {k: list(v.shape) for k, v in state.items()},
    }
    if module.text_classifier and not module.text_depends_on_image:
        was_training = module.training
        module.eval()  # no dropout in the exported classifier
        try:
            emb = module.class_embeddings().detach().float().cpu()  # [C, D]
        finally:
            module.train(was_training)
        blobs[CLASS_EMBEDDINGS_FILE] = io.safetensors_bytes(
            {"class_embeddings": emb},
            {"format": "pt", "classnames": json.dumps(list(module.classnames)), "normalized": "true"},
        )
        config["class_embeddings"] = {
            "file": CLASS_EMBEDDINGS_FILE,
            "key": "class_embeddings",
            "shape": list(emb.shape),
            "normalized": True,
            "rows": "classnames, in order",
            "usage": "logits = logit_scale * normalize(image_features) @ class_embeddings.T",
        }
        config["logit_scale"] = float(clip.logit_scale.detach())
    config["files"] = {name: {"sha256": hashlib.sha256(b).hexdigest()} for name, b in blobs.items()}
    config.update(extra)
    try:
        text = json.dumps(config, indent=2, ensure_ascii=False) + "\n"
    except TypeError as e:
        raise TypeError(f"save_prompts: prompt_config.json entries must be JSON-serialisable: {e}") from e
    blobs[CONFIG_FILE] = text.encode("utf-8")

    # Stage every file, then move them into place with the config last: the config's checksums
    # tell load_prompts whether the tensor files beside it belong to it.
    staged: dict[str, Path] = {}
    try:
        for name, data in blobs.items():
            staged[name] = io.stage(out_dir / name, lambda f, data=data: f.write(data))
    except BaseException:
        for tmp in staged.values():
            io.discard(tmp)
        raise
    for name in [n for n in staged if n != CONFIG_FILE] + [CONFIG_FILE]:
        io.commit(staged[name], out_dir / name)
    if CLASS_EMBEDDINGS_FILE not in blobs:  # a stale classifier from an earlier export would mislead
        io.discard(out_dir / CLASS_EMBEDDINGS_FILE)
    log.info("exported %s prompts (%s) to %s", method, ", ".join(config["tensors"]) or "no tensors", out_dir)
    return out_dir / CONFIG_FILE


def _jsonable_hparams(module: PromptModule) -> dict[str, Any]:
    hp = dict(getattr(module, "hparams", {}) or {})
    for k, v in hp.items():
        try:
            json.dumps(v)
        except TypeError as e:
            raise TypeError(
                f"{type(module).__name__} hparam {k}={v!r} is not JSON-serialisable, so the export could not "
                "rebuild the method; give it as plain data (str, number, bool, list, dict)"
            ) from e
    return hp


def resolve_export_dir(path: Path) -> Path:
    """Accept the export directory, its config file, or a run directory holding ``prompts/``."""
    if path.is_file() and path.name == CONFIG_FILE:
        return path.parent
    if path.is_dir() and not (path / CONFIG_FILE).exists() and (path / "prompts" / CONFIG_FILE).exists():
        return path / "prompts"
    return path


def read_prompt_config(path: str | Path) -> dict[str, Any]:
    """The ``prompt_config.json`` of an export directory (or of a run directory's ``prompts/``), checked.

    Raises:
        FileNotFoundError: there is none; ValueError: it is empty, not JSON, not a promptlab
        prompt config, or of a newer format. Every message names the file.
    """
    cfg_path = resolve_export_dir(Path(path)) / CONFIG_FILE
    if not cfg_path.is_file():
        raise FileNotFoundError(
            f"{cfg_path}: no prompt export here (expected {CONFIG_FILE} from save_prompts)"
        )
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_path}: not valid JSON ({e}); export the prompts again") from e
    if not isinstance(cfg, dict) or "method" not in cfg:
        raise ValueError(f"{cfg_path}: not a promptlab prompt config (no 'method' entry)")
    if int(cfg.get("format_version", 1)) > FORMAT_VERSION:
        raise ValueError(
            f"{cfg_path}: export format {cfg['format_version']} is newer than this promptlab understands "
            f"({FORMAT_VERSION}); upgrade promptlab"
        )
    return cfg


def load_prompts(
    path: str | Path,
    clip: FrozenCLIP,
    classnames: Sequence[str] | None = None,
    *,
    strict_weights: bool = True,
    hparams: dict[str, Any] | None = None,
) -> PromptModule:
    """Rebuild a prompt module from an export directory onto ``clip``.

    Args:
        path: the export directory (or its ``prompt_config.json``, or a run directory with ``prompts/``).
        clip: the frozen backbone; it must have the width and embedding size the prompts were learned with.
        classnames: serve these classes instead of the saved ones (base → new, cross-dataset).
        strict_weights: refuse a backbone whose weights fingerprint differs from the one the prompts
            were learned on. Prompts are tied to the weights, not only to the shapes; pass ``False``
            to transfer them deliberately (a warning is logged).
        hparams: replace some recorded hyperparameters when rebuilding, e.g. the dataset's
            ``template`` when the prompts are evaluated on another dataset.

    Returns:
        The rebuilt module, on ``clip``'s device, with the learned tensors loaded.

    Raises:
        FileNotFoundError: the config or a tensor file is missing.
        ValueError: unknown method, different backbone, fingerprint mismatch, files that do not
            match the config, or class names the method cannot serve (e.g. a class-specific context).
    """
    export_dir = resolve_export_dir(Path(path))
    cfg_path = export_dir / CONFIG_FILE
    cfg = read_prompt_config(export_dir)
    method = cfg["method"]
    cls = method_class(cfg, cfg_path)
    _check_backbone(cfg, clip, cfg_path, strict_weights)

    tensors_path = export_dir / TENSORS_FILE
    if not tensors_path.is_file():
        raise FileNotFoundError(f"{tensors_path}: missing; {cfg_path} expects the learned tensors there")
    data = tensors_path.read_bytes()
    want = cfg.get("files", {}).get(TENSORS_FILE, {}).get("sha256")
    if want is not None and hashlib.sha256(data).hexdigest() != want:
        raise ValueError(
            f"{tensors_path} does not match {cfg_path} (checksum differs): an interrupted save or files from "
            "two different exports; export again"
        )
    from safetensors.torch import load as load_safetensors

    state = load_safetensors(data)

    saved_names = list(cfg.get("classnames") or [])
    try:
        # The method's random init is overwritten below; it must not move the caller's RNG stream.
        with torch.random.fork_rng(devices=[]):
            module = cls(clip, saved_names, **{**(cfg.get("hparams") or {}), **(hparams or {})})
    except TypeError as e:
        raise ValueError(f"{cfg_path}: cannot rebuild {method} from its hparams ({e})") from e
    module.match_backbone_precision()  # reference_fp16 backbone: learned tensors in the reference's dtypes
    module.load_prompt_state_dict(state, source=str(tensors_path))
    if classnames is not None:
        try:
            module.set_classnames(list(classnames))
        except ValueError as e:
            raise ValueError(f"{cfg_path}: {e}") from e
    log.info("loaded %s prompts from %s (%d classes)", method, export_dir, len(module.classnames))
    return module.to(clip.device)


def component_path(module: PromptModule | type[PromptModule]) -> str:
    """``module.Class``: the import path an export records, so a user's own method can be rebuilt."""
    cls = module if isinstance(module, type) else type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


def method_class(cfg: dict[str, Any], cfg_path: Path) -> type[PromptModule]:
    """The class an export was made with: promptlab's by its key, a user's by its recorded import path.

    A user's class is imported under the trust rule (:mod:`promptlab.trust`): only when its module was
    trusted (``--trust-module`` / ``$PROMPTLAB_TRUSTED_MODULES``), and only if it is a PromptModule.
    """
    method, component = cfg["method"], cfg.get("component")
    if method in METHODS and component in (None, component_path(METHODS[method])):
        return METHODS[method]
    if not isinstance(component, str):
        raise ValueError(
            f"{cfg_path}: unknown method {method!r} and no 'component' import path to rebuild it "
            f"(exports record it since promptlab 0.1.1); known methods: {', '.join(sorted(METHODS))}"
        )
    module = component.rsplit(".", 1)[0]
    try:
        return resolve_component(component, "method")
    except ConfigError as e:
        raise ValueError(
            f"{cfg_path}: method {component!r} cannot be rebuilt: {e.reason}. Its module {module!r} must be "
            f"importable (run from its folder with PYTHONPATH=., or pip install it) and trusted "
            f"(promptlab --trust-module {module.split('.')[0]} ..., or "
            f"PROMPTLAB_TRUSTED_MODULES={module.split('.')[0]})"
        ) from None


def _check_backbone(cfg: dict, clip: FrozenCLIP, cfg_path: Path, strict_weights: bool) -> None:
    """Shapes must agree always; the weights must agree unless the caller says otherwise.

    The architecture *name* is not compared on its own: the same weights loaded through another
    route (an OpenAI ``.pt`` file instead of the open_clip tag) carry another name. The fingerprint
    decides whether the weights are the same.
    """
    saved = f"{cfg.get('arch')} (pretrained={cfg.get('pretrained')})"
    here = f"{clip.arch} (pretrained={clip.pretrained})"
    for key in ("width", "embed_dim"):
        if key in cfg and int(cfg[key]) != int(getattr(clip, key)):
            raise ValueError(
                f"{cfg_path}: prompts were learned on a different backbone: {key} {cfg[key]} on {saved}, "
                f"but {key} {getattr(clip, key)} on the given {here}"
            )
    fp = cfg.get("fingerprint")
    if fp is None or fp == clip.fingerprint():
        return
    msg = (
        f"{cfg_path}: prompts were learned on weights with fingerprint {fp} ({saved}), the given backbone has "
        f"fingerprint {clip.fingerprint()} ({here})"
    )
    if strict_weights:
        raise ValueError(msg + "; pass strict_weights=False to load them onto these weights anyway")
    log.warning("%s; loading anyway (strict_weights=False)", msg)


# ---------------------------------------------------------------------- CoOp import
def import_coop_checkpoint(
    path: str | Path,
    clip: FrozenCLIP,
    classnames: Sequence[str],
    *,
    class_token_position: str = "end",
) -> CoOp:
    """A CoOp checkpoint of KaiyangZhou/CoOp as a :class:`~promptlab.methods.CoOp`; see
    :func:`promptlab.importers.import_checkpoint`, which also reads CoCoOp, KgCoOp, MaPLe and IVLP runs.

    Args:
        path: ``prompt_learner/model.pth.tar-N``, its directory or the run directory (the last epoch).
        clip: the backbone the prompts were learned on.
        classnames: the classes to serve.
        class_token_position: where CoOp put the class token; the checkpoint does not record it.
    """
    from promptlab.importers import import_checkpoint

    module = import_checkpoint(
        path, clip, classnames, source="coop", class_token_position=class_token_position
    )
    assert isinstance(module, CoOp)
    return module


# ---------------------------------------------------------------------- interpretation
def _token_strings(clip: FrozenCLIP, ids: torch.Tensor) -> list[str]:
    """Readable vocabulary entries: the BPE end-of-word mark removed, byte-level characters decoded."""
    tok = clip.tokenizer
    decoder = getattr(tok, "decoder", None)
    byte_decoder = getattr(tok, "byte_decoder", None)
    out = []
    for i in ids.tolist():
        if decoder is None:
            inner = getattr(tok, "tokenizer", None)
            s = inner.convert_ids_to_tokens(i) if hasattr(inner, "convert_ids_to_tokens") else str(i)
        else:
            s = decoder[i]
            if byte_decoder is not None and not s.startswith("<|"):
                try:
                    s = bytearray(byte_decoder[c] for c in s.replace("</w>", "")).decode(
                        "utf-8", errors="replace"
                    )
                except KeyError:
                    s = s.replace("</w>", "")
            s = s.replace("</w>", "")
        out.append(s)
    return out


def _nearest(x: torch.Tensor, emb: torch.Tensor, k: int, metric: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` rows of ``emb`` [V, W] nearest to each row of ``x`` [b, W]: (scores [b, k], row ids [b, k]).

    ``metric`` is ``"cosine"`` (similarity, largest first) or ``"l2"`` (distance, smallest first). A
    matrix product shortlists ``k + 16`` candidates; their scores are then recomputed term by term, so
    equal vectors get equal scores, and a stable sort of the candidates in row order lists equal
    scores by ascending id (``topk`` orders ties arbitrarily).
    """
    cosine = metric == "cosine"
    if cosine:
        x, emb = F.normalize(x, dim=-1), F.normalize(emb, dim=-1)
    scores = x @ emb.t() if cosine else torch.cdist(x, emb)  # [b, V]
    m = min(scores.shape[1], k + 16)
    cand = scores.topk(m, dim=-1, largest=cosine).indices.sort(dim=-1).values  # [b, m], ascending id
    exact = (x[:, None, :] * emb[cand]).sum(-1) if cosine else (x[:, None, :] - emb[cand]).norm(dim=-1)
    values, order = exact.sort(dim=-1, descending=cosine, stable=True)  # [b, m]
    return values[:, :k], cand.gather(1, order[:, :k])


@torch.no_grad()
def interpret(module_or_ctx: PromptModule | torch.Tensor, clip: FrozenCLIP, topk: int = 5) -> list[dict]:
    """Nearest vocabulary tokens to each learned context vector, by cosine similarity and by L2 distance.

    CoOp's ``interpret_prompt.py`` reads prompts by Euclidean distance to the token embeddings; the
    cosine ranking is added because context vectors often drift in norm while keeping direction.
    Distances are computed in float64. Tokens whose embedding is all zeros (never learned: the sandbox
    CLIP's unused vocabulary) are not candidates; equal scores are listed by ascending token id.

    Args:
        module_or_ctx: a module with a ``ctx`` tensor, or the tensor itself: [n_ctx, W] or [C, n_ctx, W].
            A mixture of experts (a module with ``expert_names``) holds one context per expert in
            ``ctx``: a sequence of [n_e, W] tensors or one [E, n_ctx, W] tensor.
        clip: the backbone whose token embedding table is searched.
        topk: tokens per context vector.

    Returns:
        One row per context vector: ``{"class": c or None, "classname": name or None, "position": j,
        "cosine": [(token, similarity), ...], "l2": [(token, distance), ...]}``, best first; rows of
        a mixture also carry ``"expert": e`` and ``"expert_name"``.
    """
    classnames: list[str] | None = None
    if isinstance(module_or_ctx, torch.Tensor):
        ctx = module_or_ctx
    else:
        ctx = getattr(module_or_ctx, "ctx", None)
        experts = list(getattr(module_or_ctx, "expert_names", None) or [])
        if experts and isinstance(ctx, torch.Tensor) and ctx.dim() == 3 and ctx.shape[0] == len(experts):
            ctx = list(ctx.unbind(0))  # [E, n_ctx, W]: one context per expert
        if isinstance(ctx, (list, tuple, torch.nn.ParameterList)):
            names = experts or [str(e) for e in range(len(ctx))]
            return [
                {**row, "expert": e, "expert_name": names[e]}
                for e, c in enumerate(ctx)
                for row in interpret(c, clip, topk)
            ]
        if not isinstance(ctx, torch.Tensor):
            raise ValueError(f"{type(module_or_ctx).__name__} has no 'ctx' tensor to interpret")
        classnames = list(getattr(module_or_ctx, "classnames", []) or []) or None
    if ctx.dim() not in (2, 3):
        raise ValueError(f"context should be [n_ctx, W] or [C, n_ctx, W], got {list(ctx.shape)}")
    table = clip.token_embedding_table.detach()  # [V, W]
    if ctx.shape[-1] != table.shape[1]:
        raise ValueError(
            f"context width {ctx.shape[-1]} differs from the token embedding width {table.shape[1]}"
        )
    # Rows of zeros are not words: tokens the backbone never learned (the sandbox CLIP ships its unused
    # vocabulary as zeros). Kept, each would sit at distance |ctx| and tie with thousands of others.
    vocab = table.ne(0).any(dim=1).nonzero().squeeze(1)  # [V'] token ids searched, ascending
    emb = table[vocab].double()  # [V', W]
    csc = ctx.dim() == 3
    n_ctx = ctx.shape[-2]
    x = ctx.detach().double().to(emb.device).reshape(-1, emb.shape[1])  # [R, W], R = n_cls * n_ctx
    k = max(1, min(int(topk), emb.shape[0]))

    rows: list[dict] = []
    for start in range(0, x.shape[0], 256):  # bounded memory for class-specific contexts of many classes
        xb = x[start : start + 256]  # [b, W]
        sim, sim_idx = _nearest(xb, emb, k, "cosine")
        dist, dist_idx = _nearest(xb, emb, k, "l2")
        for r in range(xb.shape[0]):
            g = start + r
            c, j = divmod(g, n_ctx)
            rows.append(
                {
                    "class": c if csc else None,
                    "classname": classnames[c] if csc and classnames and c < len(classnames) else None,
                    "position": j,
                    "cosine": list(zip(_token_strings(clip, vocab[sim_idx[r]]), sim[r].tolist())),
                    "l2": list(zip(_token_strings(clip, vocab[dist_idx[r]]), dist[r].tolist())),
                }
            )
    return rows


def format_interpretation(rows: Sequence[dict]) -> str:
    """A plain-text table of :func:`interpret` rows, with the nearest-word reading of each prompt."""
    if not rows:
        return "(no context vectors)"
    lines: list[str] = []
    groups: dict[Any, list[dict]] = {}
    for row in rows:
        groups.setdefault((row.get("expert"), row.get("class")), []).append(row)

    def cell(pairs: Sequence[tuple[str, float]]) -> str:
        return ", ".join(f"{t!r} {v:.3f}" for t, v in pairs)

    for (e, c), grp in groups.items():
        name = grp[0].get("classname")
        title = "unified context" if c is None else f"class {c}" + (f" ({name})" if name else "")
        if e is not None:
            title = f"expert {e} ({grp[0].get('expert_name')})" + ("" if c is None else f", {title}")
        reading = " ".join(r["l2"][0][0] if r["l2"] else "?" for r in grp)
        lines.append(f"{title}: nearest words (L2): {reading}")
        cos_w = max(len("cosine (similarity)"), *(len(cell(r["cosine"])) for r in grp))
        lines.append(f"  {'pos':>4}  {'cosine (similarity)':<{cos_w}}  L2 (distance)")
        for r in grp:
            lines.append(f"  {r['position']:>4}  {cell(r['cosine']):<{cos_w}}  {cell(r['l2'])}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
