"""``emov2 viz cam | erf | windows | frontier``: the paper's pictures for any model (thin layer over
:mod:`emov2.tools.viz`). Each command writes PNGs (and with ``--json`` the numbers behind them) to ``--out``."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, NoReturn, Optional, Tuple

import numpy as np
import torch
import typer
from rich.console import Console

from ..checkpoint import CheckpointError
from ..factory import UnknownModelError, check_model_name
from ..tools import viz as V
from .app import app

viz_app = typer.Typer(add_completion=False, no_args_is_help=True,
                      help='Grad-CAM, effective receptive fields, attention windows and the accuracy frontier.')
app.add_typer(viz_app, name='viz')
_err = Console(stderr=True)
_out = Console()

OUT = typer.Option(Path('runs/viz'), '--out', help='Folder for the PNG (and JSON) files.')
JSON = typer.Option(False, '--json', help='Also write the numbers behind each picture as JSON.')
IMAGES = typer.Argument(None, help='Image files (default: the photographs scikit-image ships: '
                                   + ', '.join(V.SAMPLE_IMAGES) + ').', show_default=False)


def _fail(message: str, code: int = 2) -> NoReturn:
    """One red line on stderr, no traceback."""
    _err.print(f'[red]error:[/red] {message}', highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _load_images(paths: Optional[List[Path]]) -> List[Tuple[str, np.ndarray]]:
    if not paths:
        return V.sample_images()
    return [(p.stem, V.load_image(p)) for p in paths]


def _guard(fn):
    """Run ``fn()``, turning the user's mistakes (unknown model, missing file, bad value) into one line."""
    try:
        return fn()
    except UnknownModelError as exc:
        _fail(str(exc).split(' (available')[0] + f' (see emov2 zoo; models: {", ".join(exc.available)})')
    except (FileNotFoundError, CheckpointError, ValueError) as exc:
        _fail(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)


def _init_gamma(net: torch.nn.Module, checkpoint: Optional[Path], value: Optional[float]) -> None:
    """``--layer-scale``: fill the LayerScale gammas of a model at initialisation (trained weights keep theirs)."""
    if checkpoint is None and value is not None:
        V.set_layer_scale(net, value)


def _wrote(paths: List[Path]) -> None:
    _out.print('wrote ' + ', '.join(str(p) for p in paths), highlight=False, soft_wrap=True)


@viz_app.command()
def cam(
        images: Optional[List[Path]] = IMAGES,
        model: List[str] = typer.Option(['emov1_1m', 'emov2_1m'], '--model', '-m',
                                        help='Model(s), side by side (repeat the option): classifiers, detector kinds '
                                             '(retinanet, ssdlite, maskrcnn) or segmenter kinds (deeplabv3, fpn, '
                                             'segformer, pspnet, u_emov2_5m, unet_s5_d16).'),
        checkpoint: List[Path] = typer.Option([], '--checkpoint', '-c',
                                              help='Weights for the i-th --model (repeat; fewer = the rest at init). '
                                                   'Detectors / segmenters: a checkpoint of emov2 detect / segment train.'),
        method: str = typer.Option('gradcam', '--method', help='CAM method: ' + ', '.join(V.CAM_METHODS) + '.'),
        target_class: Optional[int] = typer.Option(None, '--class', help='Class to explain (default: each model\'s top '
                                                                         'class; segmenters: the class covering most pixels).'),
        task: str = typer.Option('auto', '--task', help='classify, detect, segment, or auto (from each model name).'),
        backbone: str = typer.Option('emov2_1m', '--backbone', help='Backbone of detectors / segmenters built at init.'),
        num_classes: Optional[int] = typer.Option(None, '--num-classes', help='Classes of detectors / segmenters built '
                                                                              'at init (default 80 / 150).'),
        boxes: int = typer.Option(3, '--boxes', help='Detectors: explain this many top-scoring boxes per image.'),
        score_thresh: float = typer.Option(0.0, '--score-thresh', help='Detectors: only boxes scoring at least this.'),
        size: Optional[int] = typer.Option(None, '--size', help='Input size (default: the checkpoint\'s, else 224).'),
        seed: int = typer.Option(0, '--seed', help='Initialisation seed for models without weights.'),
        layer_scale: Optional[float] = typer.Option(
            None, '--layer-scale', help='LayerScale gamma of models at initialisation (default: as built, 1e-6, which '
                                        'makes every EMOv2 stage output ~1e-6 and CAMs of untrained models mostly 0; '
                                        '1.0 as in viz erf). Trained weights keep theirs.'),
        out: Path = OUT, json_out: bool = JSON,
) -> None:
    """CAMs (Fig. 7) on the last stage, several models side by side: classifiers (top class), detectors
    (pytorch-grad-cam's FasterRCNNBoxScoreTarget on their top boxes) and segmenters (SemanticSegmentationTarget
    on the pixels of one class)."""
    def run() -> None:
        if len(checkpoint) > len(model):
            raise ValueError(f'{len(checkpoint)} --checkpoint for {len(model)} --model')
        if method not in V.CAM_METHODS:
            raise ValueError(f'unknown CAM method {method!r} (available: {", ".join(V.CAM_METHODS)})')
        if task not in ('auto', 'classify', 'detect', 'segment'):
            raise ValueError(f"--task must be auto, classify, detect or segment, got {task!r}")
        if boxes < 1:
            raise ValueError(f'--boxes must be at least 1, got {boxes}')
        tasks = [V.task_of(name) if task == 'auto' else task for name in model]
        for name, t in zip(model, tasks):
            if t == 'classify':
                check_model_name(name)
            elif t != V.task_of(name) and V.task_of(name) != 'classify':
                raise ValueError(f'{name} is a {V.task_of(name)} model, not {t}')
        if any(t != 'classify' for t in tasks):
            check_model_name(backbone)
        imgs = _load_images(images)
        cams: Dict[str, np.ndarray] = {}
        labels: Dict[str, List[str]] = {}
        drawn_boxes: Dict[str, List[np.ndarray]] = {}
        shown = None
        record: Dict[str, Any] = {'images': [n for n, _ in imgs], 'method': method, 'models': {}}
        for i, (name, t) in enumerate(zip(model, tasks)):
            torch.manual_seed(seed)
            ckpt = checkpoint[i] if i < len(checkpoint) else None
            entry: Dict[str, Any] = dict(task=t, checkpoint=str(ckpt) if ckpt else None)
            if t == 'classify':
                net, info = V.build_model(name, ckpt)
                _init_gamma(net, ckpt, layer_scale)
                s = size or info['img_size'] or 224
                x, arr = V.images_to_tensor([im for _, im in imgs], s, info['mean'], info['std'])
                maps, classes = V.grad_cam(net, x, method, target_class)
                lab = [f'class {c}' for c in classes]
                entry.update(classes=classes)
            elif t == 'detect':
                net, info = V.build_task_model('detect', name, backbone, ckpt, num_classes, size or 224)
                _init_gamma(net, ckpt, layer_scale)
                s = size or info['img_size'] or 224
                x, arr = V.images_to_tensor([im for _, im in imgs], s, info['mean'], info['std'])
                maps, found = V.detector_cam(net, x, method, boxes, score_thresh)
                off, names = info['label_offset'], info['class_names']
                lab = [', '.join(f'{names[int(c) - off]} {sc:.2f}' for c, sc in zip(d['labels'], d['scores']))
                       for d in found]
                drawn = [d['boxes'] for d in found]
                entry.update(kind=info['kind'], backbone=None if ckpt else backbone,
                             detections=[dict(boxes=d['boxes'], classes=[int(c) - off for c in d['labels']],
                                              scores=d['scores']) for d in found])
            else:
                net, info = V.build_task_model('segment', name, backbone, ckpt, num_classes)
                _init_gamma(net, ckpt, layer_scale)
                s = size or 224
                x, arr = V.images_to_tensor([im for _, im in imgs], s, info['mean'], info['std'])
                maps, classes, pred = V.segmenter_cam(net, x, method, target_class)
                names = info['class_names']
                lab = [f'{names[c]} ({100 * float((p == c).mean()):.0f}% of pixels)' for c, p in zip(classes, pred)]
                entry.update(kind=info['kind'], backbone=None if ckpt else backbone, classes=classes,
                             class_fraction=[float((p == c).mean()) for c, p in zip(classes, pred)])
            if shown is not None and shown.shape != arr.shape:
                raise ValueError('models with different input sizes: pass --size')
            shown = arr
            key = f'{name} ({"trained" if ckpt else "init"})'
            entry['layer_scale_init'] = layer_scale if ckpt is None and layer_scale is not None else None
            while key in cams:
                key += "'"
            cams[key], labels[key] = maps, lab
            if t == 'detect':
                drawn_boxes[key] = drawn
            entry.update(input=s, cam_mean=[float(m.mean()) for m in maps], cams=maps)
            record['models'][key] = entry
        out.mkdir(parents=True, exist_ok=True)
        files = [V.plot_cam_grid(shown, cams, out / 'cam.png', title=f'{method} on the last stage', labels=labels,
                                 boxes=drawn_boxes)]
        if json_out:
            files.append(V.write_json(record, out / 'cam.json'))
        _wrote(files)
    _guard(run)


@viz_app.command()
def erf(
        images: Optional[List[Path]] = IMAGES,
        model: str = typer.Option('emov2_1m', '--model', '-m', help='Model (with --compare: the EMOv2 model).'),
        checkpoint: Optional[Path] = typer.Option(None, '--checkpoint', '-c', help='Trained weights (default: initialisation).'),
        stage: Optional[int] = typer.Option(None, '--stage', help='Stage 1-4 whose centre unit is traced (default: the last; 3 with --compare).'),
        block: Optional[int] = typer.Option(None, '--block', help='Only up to this block of --stage.'),
        compare: bool = typer.Option(False, '--compare', help='Neighbour, distant, spanning attention and EMOv1 side by side (Fig. 1 bottom).'),
        v1_model: Optional[str] = typer.Option(None, '--v1-model', help='EMOv1 model for --compare (default: the same size).'),
        v1_checkpoint: Optional[Path] = typer.Option(None, '--v1-checkpoint', help='Weights of the EMOv1 model for --compare.'),
        layer_scale: Optional[float] = typer.Option(
            None, '--layer-scale', help='LayerScale gamma of models at initialisation (default 1.0: the built 1e-6 '
                                        'hides every residual branch, attention included; 1e-6 = exactly as built). '
                                        'Trained weights keep theirs.'),
        size: Optional[int] = typer.Option(None, '--size', help='Input size (default: the checkpoint\'s, else 224; 160 with --compare).'),
        seed: int = typer.Option(0, '--seed', help='Initialisation seed (the same for every compared model).'),
        out: Path = OUT, json_out: bool = JSON,
) -> None:
    """Effective receptive field: |d centre unit / d input| averaged over the images, with its 90%-mass area."""
    def run() -> None:
        check_model_name(model)
        imgs = _load_images(images)
        runs: List[Tuple[str, str, Optional[Path], Dict[str, Any]]] = []
        if compare:
            for mode in ('neighbour', 'distant', 'spanning'):
                runs.append((f'{model} {mode}', model, checkpoint, {'attention': mode}))
            v1 = v1_model or model.replace('emov2', 'emov1')
            if v1 != model:
                check_model_name(v1)
                if checkpoint is None or v1_checkpoint is not None:
                    runs.append((f'{v1}', v1, v1_checkpoint, {}))
                else:
                    _err.print(f'note: no --v1-checkpoint, so {v1} is left out of a comparison of trained weights',
                               highlight=False)
        else:
            runs.append((model, model, checkpoint, {}))
        st = stage if stage is not None else (3 if compare else None)
        erfs: Dict[str, np.ndarray] = {}
        spreads: Dict[str, float] = {}
        record: Dict[str, Any] = {'images': [n for n, _ in imgs], 'stage': st, 'block': block, 'mass': 0.9, 'runs': {}}
        for label, name, ckpt, switches in runs:
            torch.manual_seed(seed)
            net, info = V.build_model(name, ckpt, **switches)
            gamma = None
            if ckpt is None:
                gamma = 1.0 if layer_scale is None else layer_scale
                V.set_layer_scale(net, gamma)
            s = size or info['img_size'] or (160 if compare else 224)
            x, _ = V.images_to_tensor([im for _, im in imgs], s, info['mean'], info['std'])
            e = V.effective_receptive_field(net, x, st, block)
            key = f'{label} ({"trained" if ckpt else "init"})'
            erfs[key], spreads[key] = e, V.erf_spread(e)
            record['runs'][key] = dict(model=name, switches=switches, checkpoint=str(ckpt) if ckpt else None,
                                       input=s, layer_scale_init=gamma, spread90=spreads[key], erf=e)
        out.mkdir(parents=True, exist_ok=True)
        where = f'stage {st if st is not None else "4 (last)"}' + (f', block {block}' if block is not None else '')
        ls = '' if all(r['layer_scale_init'] is None for r in record['runs'].values()) else \
            f', init LayerScale gamma={layer_scale if layer_scale is not None else 1.0:g}'
        name = 'erf_compare' if compare else 'erf'
        files = [V.plot_erf_grid(erfs, spreads, out / f'{name}.png',
                                 title=f'ERF of the centre unit, {where}, {len(imgs)} images{ls}')]
        if json_out:
            files.append(V.write_json(record, out / f'{name}.json'))
        for k, v in spreads.items():
            _out.print(f'{k}: 90% of the gradient mass in {100 * v:.1f}% of the pixels', highlight=False)
        _wrote(files)
    _guard(run)


@viz_app.command()
def windows(
        image: Optional[Path] = typer.Argument(None, help='Image file (default: scikit-image\'s astronaut).'),
        model: str = typer.Option('emov2_1m', '--model', '-m', help='Model whose attention weights are drawn.'),
        checkpoint: Optional[Path] = typer.Option(None, '--checkpoint', '-c', help='Trained weights (default: initialisation).'),
        stage: int = typer.Option(3, '--stage', help='Stage 1-4 (EMOv2 attends in stages 3-4).'),
        block: Optional[int] = typer.Option(None, '--block', help='Attention block of the stage (default: the first).'),
        size: Optional[int] = typer.Option(None, '--size', help='Input size (default: the checkpoint\'s, else 224).'),
        query: Optional[Tuple[int, int]] = typer.Option(None, '--query', help='Query pixel Y X in the input (default: the centre).'),
        window_size: Optional[int] = typer.Option(None, '--window-size', help='Window (default: the model\'s, 7).'),
        seed: int = typer.Option(0, '--seed'),
        out: Path = OUT, json_out: bool = JSON,
) -> None:
    """The neighbour and distant window of one query pixel (padding included) and the weights it gives them."""
    def run() -> None:
        check_model_name(model)
        name, img = _load_images([image])[0] if image else V.sample_images(['astronaut'])[0]
        torch.manual_seed(seed)
        switches = {'window_size': window_size} if window_size else {}
        net, info = V.build_model(model, checkpoint, **switches)
        s = size or info['img_size'] or 224
        x, arr = V.images_to_tensor([img], s, info['mean'], info['std'])
        q = tuple(query) if query else None
        try:
            res = V.attention_weights_for_query(net, x, stage, block, q)
            weights = res['weights']
        except ValueError as exc:
            if 'no window attention' not in str(exc):
                raise
            _err.print(f'note: {exc}; drawing the windows only', highlight=False)
            res = V.window_partition_masks(s, stage, window_size or 7, q)
            weights = None
        state = 'trained' if checkpoint else 'init'
        out.mkdir(parents=True, exist_ok=True)
        title = (f'{model} ({state}) on {name}, {s}x{s}: stage {stage}' + (f' block {res["block"]}' if weights else '')
                 + f', window {res["window_size"]}, map {res["feature_size"][0]}x{res["feature_size"][1]} padded to '
                 f'{res["padded_size"][0]}x{res["padded_size"][1]}; query cell {tuple(res["query_cell"])}')
        files = [V.plot_windows(arr[0], res, out / 'windows.png', weights, title=title)]
        if json_out:
            files.append(V.write_json(dict(res, model=model, checkpoint=str(checkpoint) if checkpoint else None,
                                           image=name), out / 'windows.json'))
        _wrote(files)
    _guard(run)


@viz_app.command()
def frontier(
        bench: Optional[Path] = typer.Option(None, '--bench', help='bench.json of `emov2 bench` (adds top-1 vs measured img/s).'),
        targets: Optional[Path] = typer.Option(None, '--targets', help='paper_targets.json (default: the packaged copy).'),
        measure: bool = typer.Option(True, '--measure/--no-measure', help='Count our params and FLOPs (fvcore, batch 1).'),
        peers: Optional[Path] = typer.Option(None, '--peers', help='Peers JSON (default: the packaged emov2/data/frontier_peers.json).'),
        no_peers: bool = typer.Option(False, '--no-peers', help='Only EMOv2, EMOv1 and the Table III baselines.'),
        out: Path = OUT, json_out: bool = JSON,
) -> None:
    """Fig. 1 top: ImageNet top-1 vs params, FLOPs (and measured throughput) of EMOv2, EMOv1 and their peers
    (published figures of MobileNetV2/V3, EfficientNet, MobileViT, EdgeNeXt, EfficientFormer(V2), DeiT, PVT)."""
    def run() -> None:
        if bench is not None and not bench.is_file():
            raise FileNotFoundError(f'benchmark JSON not found: {bench}')
        paper = V.paper_targets(targets)
        peer_rows = {} if no_peers else V.frontier_peers(peers)
        rows = V.frontier_data(paper, measure=measure, bench_json=bench, peers=peer_rows)
        out.mkdir(parents=True, exist_ok=True)
        files = [V.plot_frontier(rows, out / 'frontier.png')]
        if json_out:
            files.append(V.write_json(rows, out / 'frontier.json'))
        _wrote(files)
    _guard(run)
