"""Forward hooks on HF decoder models: capture and steering, with the architecture knowledge in one table.

    HookManager(model)                     context manager owning hooks; all removed on exit, exceptions included
    ActivationCapture(model, layers, components, stop_after_last=True)
                                           capture residual / attn_contribution / mlp_contribution per layer;
                                           `with ActivationCapture(model, [3]) as cap: model(**inputs)` just works
    run_forward(model, **inputs)           model(**inputs) under no_grad, use_cache=False; None when a capture stopped it
    SteeringHook(model, vector, layer, coefficient, component="residual", positions="all")
                                           add coefficient * vector where the block writes into the residual stream
    steer(model, specs)                    several SteeringHooks at once (one context)
    SteeringSpec(vector, layer, coefficient, component, positions)   one edit, checked when built
    block_sites(model) -> BlockSites       which module output is each component (checked by the identity)
    SITE_RULES / register_site_rule(SiteRule(name, attn, mlp))
                                           the known block layouts, and the public way to add one
    input_device(model) / text_config(model)   where input ids go; the text config of a (multimodal) model
    decoder_layers(model) / num_layers(model) / component_module(model, layer, component)
    hook_sites(model)                      the module paths used, for file metadata

Components are the exact vectors added into the residual stream, so that for every layer
    residual[L] == residual[L-1] + attn_contribution[L] + mlp_contribution[L]
(the embedding output for L = 0). `block_sites` checks that identity on the model itself (one tiny
forward, every layer) and refuses an architecture where it fails rather than return a wrong tensor.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Literal, Sequence

import torch
from torch import nn
from core.errors import TraitError

COMPONENTS = ("residual", "attn_contribution", "mlp_contribution")
POSITIONS = ("all", "prompt", "response")   # which tokens a steering edit acts on
Positions = Literal["all", "prompt", "response"]


class HookError(TraitError):
    """An unsupported architecture or an invalid hook request; the message says which."""


# ---------------------------------------------------------------------------------------------------
# Architecture knowledge: which child of a decoder block produces what the block adds to the residual.
# Rules are tried in order (registered ones first); the first whose children exist and that passes the
# identity check wins.

@dataclass(frozen=True)
class SiteRule:
    """Where one block layout writes into the residual stream.

    `attn` / `mlp` are paths inside a decoder block (a child name, or dotted for a deeper module) whose
    output (element 0 if a tuple) is exactly what the block adds for attention / for the MLP (or the
    whole expert block); `requires` are children that must exist for the rule to apply at all.
    """

    name: str
    attn: str
    mlp: str
    requires: tuple[str, ...] = ()


SITE_RULES: tuple[SiteRule, ...] = (
    # Gemma-2/3 and OLMo-2 normalise each sub-block's output before adding it.
    SiteRule("post-norm (Gemma-2/3, OLMo-2)", "post_attention_layernorm", "post_feedforward_layernorm",
             requires=("post_feedforward_layernorm",)),
    # Pre-norm blocks (Llama, Mistral, Qwen2, Phi-3, Mixtral / Qwen2-MoE with `mlp` = the expert block).
    SiteRule("pre-norm (Llama, Mistral, Qwen2, Phi-3, MoE)", "self_attn", "mlp"),
    SiteRule("pre-norm MoE (block_sparse_moe)", "self_attn", "block_sparse_moe"),
    SiteRule("GPT-2", "attn", "mlp"),
)

_registered_rules: list[SiteRule] = []   # register_site_rule: newest first, tried before SITE_RULES


def register_site_rule(rule: SiteRule) -> SiteRule:
    """Teach block_sites a block layout it does not know; the rule is tried before the built-in SITE_RULES.

        from core.hooks import SiteRule, register_site_rule
        register_site_rule(SiteRule("InternLM-style", attn="attention", mlp="feed_forward"))
        with ActivationCapture(model, [3], ["attn_contribution", "mlp_contribution"]) as cap: ...

    A registered rule is still checked by the identity residual[L] == residual[L-1] + attn + mlp on the
    model itself (every layer): a rule that names the wrong modules is refused, never used. Rules
    registered later are tried first, so a rule can also override a built-in one for a known layout.
    Models whose sites were already detected keep them (block_sites caches per model).
    """
    if not isinstance(rule, SiteRule):
        raise HookError(f"register_site_rule takes a SiteRule, got {type(rule).__name__}")
    for field_name in ("name", "attn", "mlp"):
        value = getattr(rule, field_name)
        if not isinstance(value, str) or not value:
            raise HookError(f"SiteRule.{field_name} must be a non-empty string, got {value!r}")
    _registered_rules.insert(0, rule)
    return rule


def site_rules() -> tuple[SiteRule, ...]:
    """Every rule block_sites tries, in order: registered ones (newest first), then SITE_RULES."""
    return tuple(_registered_rules) + SITE_RULES


@dataclass(frozen=True)
class BlockSites:
    rule: str
    layers_path: str         # e.g. "model.layers" or "base_model.model.model.layers"
    attn: str
    mlp: str
    scale: float = 1.0       # config.residual_multiplier where the block scales its adds


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _find_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder block list: the longest ModuleList named `layers` or `h` (PeftModel / multimodal wrappers too).

    The path is remembered on the model (a plain string attribute, so not a submodule and not in the state
    dict): hooks are entered once per forward while streaming, and walking every module each time is slow.
    """
    path = model.__dict__.get("_trait_layers_path")
    if path is not None:
        try:
            found = model.get_submodule(path)
        except AttributeError:  # the model was restructured since: search again
            found = None
        if isinstance(found, nn.ModuleList) and len(found) > 0:
            return path, found
    best: tuple[str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and name.split(".")[-1] in ("layers", "h") and len(mod) > 0:
            if "vision" in name or "audio" in name:
                continue
            if best is None or len(mod) > len(best[1]):
                best = (name, mod)
    if best is None:
        raise HookError(f"cannot find the decoder layers of {type(model).__name__} (no ModuleList named layers/h)")
    model.__dict__["_trait_layers_path"] = best[0]
    return best


def input_device(model: nn.Module) -> torch.device:
    """Where input ids must go: the embedding's device (works with device_map='auto' splits)."""
    try:
        return model.get_input_embeddings().weight.device
    except AttributeError:
        return next(model.parameters()).device


def text_config(model: nn.Module):
    """The config that describes the language model (the text config of a multimodal one)."""
    cfg = getattr(model, "config", None)
    getter = getattr(cfg, "get_text_config", None)
    return getter() if callable(getter) else cfg


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return _find_layers(model)[1]


def num_layers(model: nn.Module) -> int:
    return len(decoder_layers(model))


def block_sites(model: nn.Module) -> BlockSites:
    """Detect (once per model) which module outputs are the attention / MLP contributions, and verify them."""
    cached = getattr(model, "_trait_block_sites", None)
    if cached is not None:
        return cached
    path, layers = _find_layers(model)
    block = layers[0]
    children = dict(block.named_children())
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "text_config", None) or cfg
    scale = float(getattr(cfg, "residual_multiplier", 1.0) or 1.0)
    tried = []
    for rule in site_rules():
        if not all(r in children for r in rule.requires) or not all(
                _submodule(block, p) is not None for p in (rule.attn, rule.mlp)):
            continue
        sites = BlockSites(rule.name, path, rule.attn, rule.mlp, scale)
        err = _identity_error(model, sites)
        if err is None:
            setattr(model, "_trait_block_sites", sites)
            return sites
        tried.append(f"{rule.name}: {err}")
    raise HookError(
        f"unsupported architecture {type(block).__name__}: no known attention/MLP sites reproduce the block's "
        f"residual update ({'; '.join(tried) or 'children: ' + ', '.join(children)}); if you know which "
        f"modules they are, add a rule with core.hooks.register_site_rule(SiteRule(name, attn=..., mlp=...))"
    )


def _submodule(block: nn.Module, path: str) -> nn.Module | None:
    """block.get_submodule(path), or None when there is no such module."""
    try:
        return block.get_submodule(path)
    except AttributeError:
        return None


class _StopForward(Exception):
    """Raised by a hook after the last needed layer, so a capture-only pass skips the rest of the network.

    `owner` is the ActivationCapture that raised it: only that capture's `__exit__` swallows it, so a stop
    from an outer capture still ends the outer block.
    """

    def __init__(self, owner: object = None):
        super().__init__("forward stopped after the last captured layer")
        self.owner = owner


def _identity_error(model: nn.Module, sites: BlockSites) -> str | None:
    """Run every layer on a few tokens; None when out - in == attn + mlp (within dtype precision) at each.

    All layers, not only layer 0: a model whose blocks differ (a hybrid, a patched layer) must not pass on
    the strength of its first block. The forward stops after the last block, so it costs one short pass.
    """
    layers = decoder_layers(model)
    got: list[dict[str, torch.Tensor]] = [{} for _ in layers]

    def pre(i):
        def fn(_m, args, kwargs):
            got[i]["in"] = (args[0] if args else kwargs["hidden_states"]).detach().float()
        return fn

    def grab(i, key):
        def fn(_m, _i, out):
            got[i][key] = _first(out).detach().float()
        return fn

    def stop(_m, _i, _o):
        raise _StopForward

    handles = []
    try:
        for i, block in enumerate(layers):
            attn, mlp = _submodule(block, sites.attn), _submodule(block, sites.mlp)
            if attn is None or mlp is None:
                return f"layer {i} has no {sites.attn} / {sites.mlp}"
            handles += [block.register_forward_pre_hook(pre(i), with_kwargs=True),
                        attn.register_forward_hook(grab(i, "attn")),
                        mlp.register_forward_hook(grab(i, "mlp")),
                        block.register_forward_hook(grab(i, "out"))]
        handles.append(layers[-1].register_forward_hook(stop))  # registered last: runs after the grabs
        vocab = int(model.get_input_embeddings().weight.shape[0])
        ids = (torch.arange(5) * 7 + 3) % vocab
        device = model.get_input_embeddings().weight.device
        with torch.no_grad():
            try:
                model(input_ids=ids[None].to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        for h in handles:
            h.remove()
    dtype = _compute_dtype(model)
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else 1e-2
    for i, g in enumerate(got):
        if not {"in", "out", "attn", "mlp"} <= g.keys():
            return f"layer {i}: sites did not run in the forward"
        attn, mlp = g["attn"], g["mlp"]
        if attn.numel() != g["out"].numel() or mlp.numel() != g["out"].numel():
            return f"layer {i}: site output shapes {tuple(attn.shape)}, {tuple(mlp.shape)} differ from the block's"
        attn, mlp = attn.reshape(g["out"].shape), mlp.reshape(g["out"].shape)
        delta = g["out"] - g["in"]
        pred = sites.scale * (attn + mlp)
        tol = 16 * eps * (g["in"].norm() + g["out"].norm()) + 1e-3 * pred.norm() + 1e-6
        err = (delta - pred).norm()
        if not err <= tol:  # `not <=` so that a NaN fails too
            return f"layer {i}: |residual update - (attn + mlp)| = {err:.3g} > {tol:.3g}"
    return None


def _compute_dtype(model: nn.Module) -> torch.dtype:
    w = model.get_input_embeddings().weight
    return w.dtype if w.dtype.is_floating_point else torch.float16


def component_module(model: nn.Module, layer: int, component: str) -> nn.Module:
    """The module whose output is `component` at `layer` (the decoder block itself for residual)."""
    if component not in COMPONENTS:
        raise HookError(f"unknown component {component!r} (choose from {', '.join(COMPONENTS)})")
    layers = decoder_layers(model)
    if not 0 <= layer < len(layers):
        raise HookError(f"layer {layer} is out of range for a model with {len(layers)} layers (0-{len(layers) - 1})")
    if component == "residual":
        return layers[layer]
    sites = block_sites(model)
    return layers[layer].get_submodule(sites.attn if component == "attn_contribution" else sites.mlp)


def hook_sites(model: nn.Module) -> dict[str, str]:
    """Module paths (with {L}) used for each component, for the metadata of written files."""
    sites = block_sites(model)
    out = {"residual": f"{sites.layers_path}.{{L}}",
           "attn_contribution": f"{sites.layers_path}.{{L}}.{sites.attn}",
           "mlp_contribution": f"{sites.layers_path}.{{L}}.{sites.mlp}",
           "rule": sites.rule}
    if sites.scale != 1.0:
        out["scale"] = str(sites.scale)
    return out


# ---------------------------------------------------------------------------------------------------
# Hook lifetime

class HookManager:
    """Owns forward hooks; every one is removed on exit, exceptions included.

        with HookManager(model) as hm:
            hm.add_forward_hook(component_module(model, 3, "residual"), fn)
            model(**inputs)
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.handles: list = []

    def add_forward_hook(self, module: nn.Module | str, fn: Callable, with_kwargs: bool = False,
                         prepend: bool = False):
        module = self._module(module)
        h = module.register_forward_hook(fn, with_kwargs=with_kwargs, prepend=prepend)
        self.handles.append(h)
        return h

    def add_forward_pre_hook(self, module: nn.Module | str, fn: Callable, with_kwargs: bool = False):
        module = self._module(module)
        h = module.register_forward_pre_hook(fn, with_kwargs=with_kwargs)
        self.handles.append(h)
        return h

    def _module(self, module: nn.Module | str) -> nn.Module:
        return self.model.get_submodule(module) if isinstance(module, str) else module

    def remove_all(self) -> None:
        while self.handles:
            self.handles.pop().remove()

    def __enter__(self) -> "HookManager":
        return self

    def __exit__(self, *exc) -> None:
        self.remove_all()


# ---------------------------------------------------------------------------------------------------
# Capture

class ActivationCapture(HookManager):
    """Capture components at chosen layers during a forward; optionally stop right after the last one.

        with ActivationCapture(model, layers=[2, 5], components=["residual", "attn_contribution"]) as cap:
            model(input_ids=ids, attention_mask=mask)
        cap.activations[5]["residual"]        # Tensor[batch, seq, hidden], on the model's device

    With `stop_after_last` (the default), a hook raises a private exception right after the last requested
    block, so later layers, the final norm and the LM head never run. The context swallows its own stop
    exception on exit (as baukit's Trace does), so a plain `model(...)` inside it just returns to the end
    of the `with` block; `run_forward(model, ...)` inside the block catches it at the call instead
    (returning None) and adds no_grad and use_cache=False. Any other exception propagates, hooks removed.
    `capture_embedding=True` also keeps the input of block 0 (the embedding output) as `cap.embedding`.
    """

    def __init__(self, model: nn.Module, layers: Sequence[int], components: Sequence[str] = ("residual",),
                 stop_after_last: bool = True, capture_embedding: bool = False,
                 on_capture: Callable[[int, str, torch.Tensor], torch.Tensor | None] | None = None):
        super().__init__(model)
        bad = [c for c in components if c not in COMPONENTS]
        if bad:
            raise HookError(f"unknown component {bad[0]!r} (choose from {', '.join(COMPONENTS)})")
        if not layers:
            raise HookError("no layers to capture")
        self.layers = sorted(set(int(l) for l in layers))
        self.components = list(dict.fromkeys(components))
        self.stop_after_last = stop_after_last
        self.capture_embedding = capture_embedding
        self.on_capture = on_capture   # lets a caller reduce a tensor on the device (e.g. project) instead of keeping it
        self.activations: dict[int, dict[str, torch.Tensor]] = {}
        self.embedding: torch.Tensor | None = None
        self.scale = block_sites(model).scale if set(self.components) - {"residual"} else 1.0
        for layer in self.layers:
            component_module(model, layer, self.components[0])  # range check with a clear message

    def __enter__(self) -> "ActivationCapture":
        self.activations = {}
        self.embedding = None
        layers = decoder_layers(self.model)
        if self.capture_embedding:
            def pre(_m, args, kwargs):
                self.embedding = (args[0] if args else kwargs["hidden_states"]).detach()
            self.add_forward_pre_hook(layers[0], pre, with_kwargs=True)
        for layer in self.layers:
            for comp in self.components:
                self.add_forward_hook(component_module(self.model, layer, comp), self._grab(layer, comp))
        if self.stop_after_last:
            def stop(_m, _i, _o):
                raise _StopForward(self)
            self.add_forward_hook(layers[self.layers[-1]], stop)  # registered last: runs after the captures
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.remove_all()
        # our own early stop is how the forward is meant to end; anything else (another capture's stop too) propagates
        return isinstance(exc, _StopForward) and exc.owner is self

    def _grab(self, layer: int, comp: str):
        def fn(_m, _i, out):
            t = _first(out).detach()
            if comp != "residual" and self.scale != 1.0:
                t = t * self.scale
            if self.on_capture is not None:
                t = self.on_capture(layer, comp, t)
            if t is not None:
                self.activations.setdefault(layer, {})[comp] = t
        return fn


def run_forward(model: nn.Module, **inputs):
    """model(**inputs) under no_grad with use_cache=False; returns None when a capture stopped it early."""
    inputs.setdefault("use_cache", False)
    with torch.no_grad():
        try:
            return model(**inputs)
        except _StopForward:
            return None


# ---------------------------------------------------------------------------------------------------
# Steering

@dataclass
class SteeringSpec:
    """One steering edit: add `coefficient * vector` at `layer` / `component` on `positions`.

        SteeringSpec(vector, layer=12, coefficient=4.0, positions="response")

    Checked when built (1-D vector, known component and positions), so every caller shares one check
    and one message; the layer is checked against the model when a hook is made from the spec.
    """

    vector: torch.Tensor
    layer: int
    coefficient: float = 1.0
    component: str = "residual"
    positions: Positions = "all"

    def __post_init__(self) -> None:
        if not isinstance(self.vector, torch.Tensor) or self.vector.ndim != 1:
            shape = tuple(self.vector.shape) if isinstance(self.vector, torch.Tensor) else type(self.vector).__name__
            raise HookError(f"steering vector must be 1-D, got shape {shape}")
        if self.positions not in POSITIONS:
            raise HookError(f"positions must be all, prompt or response, got {self.positions!r}")
        if self.component not in COMPONENTS:
            raise HookError(f"unknown component {self.component!r} (choose from {', '.join(COMPONENTS)})")


class SteeringHook(HookManager):
    """Add `coefficient * vector` to what block `layer` writes into the residual stream (`component`).

        with SteeringHook(model, vector, layer=12, coefficient=4.0, positions="response"):
            model.generate(**inputs)

    `positions`: all tokens, only the prompt, or only generated tokens. Positions are tracked across
    KV-cached forwards (a multi-token forward starts a new sequence at position 0; single-token forwards
    continue it), so a cached generation is steered exactly like an uncached one, and the first generated
    token (produced by the prompt forward) sees the steered prompt when positions is all/prompt.
    `prompt_len` (padded prompt length) defaults to the length of each new prompt forward: a multi-token
    forward after single-token steps, or one that is not exactly one token longer than the forward before
    it (an uncached generation step), starts a new prompt, so one context can serve several generate calls.
    The vector is not normalised: the coefficient is in activation units for a unit vector.
    """

    def __init__(self, model: nn.Module, vector: torch.Tensor, layer: int, coefficient: float = 1.0,
                 component: str = "residual", positions: Positions = "all", prompt_len: int | None = None):
        super().__init__(model)
        SteeringSpec(vector, layer, coefficient, component, positions)  # the one check of vector and positions
        self.module = component_module(model, layer, component)
        self.delta = (float(coefficient) * vector.detach().float())
        self.positions = positions
        self.prompt_len = prompt_len
        self._fixed_prompt_len = prompt_len is not None
        self._offset = 0
        self._last_seq: int | None = None

    def __enter__(self) -> "SteeringHook":
        self._offset = 0
        self._last_seq = None
        if not self._fixed_prompt_len:
            self.prompt_len = None
        # prepend: the edit runs before every other hook on the module (ours or HF's output recorders), so
        # whatever observes this module's output sees what the next layer sees, whatever the entry order.
        self.add_forward_hook(self.module, self._hook, prepend=True)
        return self

    def _hook(self, _m, _i, out):
        h = _first(out)
        seq = h.shape[-2]
        if seq > 1:  # a new (prefill or uncached) forward starts at position 0
            uncached_step = self._last_seq is not None and self._last_seq > 1 and seq == self._last_seq + 1
            if not self._fixed_prompt_len and (self.prompt_len is None or not uncached_step):
                self.prompt_len = seq
            self._offset = 0
        self._last_seq = seq
        start, self._offset = self._offset, self._offset + seq
        delta = self.delta.to(device=h.device, dtype=h.dtype)
        if self.positions == "all":
            h = h + delta
        else:
            pos = torch.arange(start, start + seq, device=h.device)
            in_prompt = pos < (self.prompt_len if self.prompt_len is not None else seq)
            mask = in_prompt if self.positions == "prompt" else ~in_prompt
            if not bool(mask.any()):
                return out
            h = h + mask.to(h.dtype)[:, None] * delta
        if isinstance(out, tuple):
            return (h,) + tuple(out[1:])
        return h


@contextlib.contextmanager
def steer(model: nn.Module, specs: Iterable[SteeringSpec], prompt_len: int | None = None) -> Iterator[list]:
    """Apply several steering specs in one context; all hooks removed on exit."""
    with contextlib.ExitStack() as stack:
        hooks = [stack.enter_context(SteeringHook(model, s.vector, s.layer, s.coefficient, s.component,
                                                  s.positions, prompt_len)) for s in specs]
        yield hooks
