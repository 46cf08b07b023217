"""User-facing tools built on the library: :mod:`.zoo` (params / FLOPs next to the paper),
:mod:`.bench` (speed, memory, efficiency), :mod:`.export` (ONNX / TorchScript / Core ML) and
:mod:`.common` (what they share: the FLOP counter and the paper's figures).

Layering: ``layers -> models -> (deploy, kernels) -> factory/checkpoint -> train -> tools -> cli``;
a tool imports only from below it (and :mod:`.common`), never from :mod:`emov2.cli`. Importing this
package imports none of the tools.
"""
