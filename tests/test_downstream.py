"""emov2 downstream: every downstream row of the paper is built and counted, and the table is honest."""
from __future__ import annotations

from emov2.tools.common import paper_targets
from emov2.tools.downstream import DownstreamRow, downstream_rows, downstream_specs, markdown_table


def test_every_downstream_row_of_the_paper_has_a_spec():
    targets = paper_targets()
    specs = {(table, row, backbone) for table, row, backbone, *_ in downstream_specs(targets)}
    want = {('detection_coco', row, b) for row, bs in targets['detection_coco'].items() if not row.startswith('_')
            for b in bs}
    want |= {('segmentation_ade20k_512', row, b) for row, bs in targets['segmentation_ade20k_512'].items()
             if not row.startswith('_') for b in bs}
    want |= {('unet_hrf_256', row, row) for row in targets['unet_hrf_256']}
    want |= {('dit_imagenet_256_400k', row, row) for row in targets['dit_imagenet_256_400k']}
    want |= {('video_kinetics400', 'v_emov2_5m', 'v_emov2_5m')}
    assert want <= specs, want - specs


def test_a_counted_row_matches_the_paper_and_the_table_prints_it():
    targets = {'video_kinetics400': paper_targets()['video_kinetics400']}
    (row,) = downstream_rows(targets)
    assert row.row == 'v_emov2_5m' and row.paper_params_m == 5.9
    assert abs(row.params_diff) < 5 and abs(row.flops_diff) < 10
    text = markdown_table([row], header=True)
    assert text.startswith('# Downstream models') and '| v_emov2_5m | v_emov2_5m | 4x160x160 |' in text


def test_notes_are_printed_once_and_referenced():
    rows = [DownstreamRow('t', 'a', 'b1', '1x1', 1.0, 1.0, 1.0, 1.0, 'same note'),
            DownstreamRow('t', 'a', 'b2', '1x1', 2.0, 1.0, 2.0, 1.0, 'same note'),
            DownstreamRow('t', 'c', 'b1', '1x1', 1.1, 1.0, 1.0, 1.0, '')]
    text = markdown_table(rows)
    assert text.count('same note') == 1 and text.count('| (1) |') == 2 and '+10.0%' in text
