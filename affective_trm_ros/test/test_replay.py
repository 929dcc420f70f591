"""Replay pieces that need no running nodes: stamps, the per-frame table, report files, labels, inputs."""

import csv
import math

import numpy as np
import pytest

from affective_trm_ros.offline.extraction.bag import (
    BagTopics,
    _match_labels,
    labels_from_csv,
    labels_from_topic,
)
from affective_trm_ros.offline.io.bags import (
    IMAGE,
    STRING,
    VALENCE_AROUSAL,
    BagError,
    BagReader,
    BagWriter,
    affective_typestore,
    make_header,
)
from affective_trm_ros.replay.report import (
    build_replay_report,
    estimate_streams,
    frame_table,
    people_report,
    people_tables,
    percentiles_ms,
    report_notices,
    untrained_line,
    write_replay_report,
)
from affective_trm_ros.replay.session import ReplayOptions, bag_inputs, plan_replay

T0 = 1_735_689_600 * 10 ** 9
FRAME_NS = 33_333_333


def _outputs(frames, skip=()):
    """Fake estimates: valence follows the frame index, one frame missing, one duplicate."""
    rows = []
    for i, stamp in enumerate(frames):
        if i in skip:
            continue
        rows.append((stamp, 'default', 0.01 * i, -0.01 * i, 0.5, 3, 10.0 + 0.05 * i))
    rows.append((frames[0], 'default', 0.99, 0.99, 1.0, 7, 99.0))   # duplicate: the first one counts
    rows.append((frames[1], 'other', 0.5, 0.5, 1.0, 1, 10.0))       # another stream: ignored
    return rows


def no_box(store):
    return store.types['sensor_msgs/msg/RegionOfInterest'](x_offset=0, y_offset=0, height=0, width=0,
                                                           do_rectify=False)


def test_header_stamp_of_serialized_messages():
    from affective_trm_ros.replay.driver import header_stamp_ns

    store = affective_typestore()
    image = store.types[IMAGE](header=make_header(T0 + 123, 'cam'), height=1, width=1, encoding='rgb8',
                               is_bigendian=0, step=3, data=np.zeros(3, np.uint8))
    assert header_stamp_ns(store.serialize_cdr(image, IMAGE)) == T0 + 123
    big_endian = store.serialize_cdr(image, IMAGE, little_endian=False)
    assert header_stamp_ns(big_endian) == T0 + 123
    with pytest.raises(ValueError):
        header_stamp_ns(b'\x00\x01')


def test_frame_table_joins_estimates_to_frames():
    frames = [T0 + i * FRAME_NS for i in range(10)]
    publish = {s: 10.0 + 0.05 * i - 0.2 for i, s in enumerate(frames)}
    embedded = {s: publish[s] + 0.03 for s in frames}
    truth = np.stack([np.linspace(-1, 1, 10), np.zeros(10)], axis=1)
    table = frame_table(frames[::-1], _outputs(frames, skip={4}), publish, embedded, truth)
    assert table.stamps_ns.tolist() == frames
    assert table.covered.tolist() == [i != 4 for i in range(10)]
    assert table.estimates[0].tolist() == [0.0, 0.0] and table.modalities[0] == 3
    assert math.isnan(table.estimates[4, 0]) and table.modalities[4] == -1
    np.testing.assert_allclose(table.latency_s[table.covered], 0.2)
    np.testing.assert_allclose(table.encode_s, 0.03)
    np.testing.assert_allclose(table.times_s, np.arange(10) * FRAME_NS / 1e9)
    report = build_replay_report(table, wall_s=2.0, mode='as fast as possible',
                                 encoders={'video': 'hsemotion_enet_b0@untrained',
                                           'text': 'minilm@all-MiniLM-L6-v2'})
    assert report['coverage'] == pytest.approx(0.9)
    assert report['frames'] == 10 and report['frames_with_estimate'] == 9
    assert report['throughput_fps'] == pytest.approx(5.0)
    assert report['latency_ms']['p50'] == pytest.approx(200.0)
    assert report['modality_presence'] == {'video': 1.0, 'audio': 1.0, 'text': 0.0}
    assert report['metrics']['valence']['n'] == 9                      # the missing frame is left out
    assert report['untrained_encoders'] == {'video': 'hsemotion_enet_b0@untrained'}


def test_percentiles_and_untrained_line():
    assert percentiles_ms(np.array([0.001, 0.002, np.nan, 0.003]))['p50'] == pytest.approx(2.0)
    assert math.isnan(percentiles_ms(np.array([np.nan]))['p95'])
    trained = untrained_line({'text': 'minilm@all-MiniLM-L6-v2'})
    assert trained.startswith('All encoders ran with their pretrained')
    line = untrained_line({'video': 'hsemotion_enet_b0@untrained', 'audio': 'dasheng_base@untrained'})
    assert line.startswith('UNTRAINED encoders') and 'video (hsemotion_enet_b0), audio (dasheng_base)' in line


def test_report_files(tmp_path):
    frames = [T0 + i * FRAME_NS for i in range(30)]
    publish = {s: 0.05 * i for i, s in enumerate(frames)}
    truth = np.stack([np.sin(np.arange(30) / 5), np.cos(np.arange(30) / 5)], axis=1)
    table = frame_table(frames, _outputs(frames), publish, publish, truth)
    report = build_replay_report(table, wall_s=3.0, mode='realtime x1', encoders={'video': 'x@untrained'},
                                 extra={'memory_mb': [(0, 100.0), (30, 101.0)], 'session': 's',
                                        'frame_id': 'camera_optical'})
    files = write_replay_report(tmp_path, table, report, title='Replay test', session='s')
    markdown = files['markdown'].read_text().splitlines()
    assert markdown[0].startswith('UNTRAINED encoders') and 'video (x)' in markdown[0]
    assert '# Replay test' in markdown
    assert any('Resident memory (MB): 100 at start' in line for line in markdown)
    with open(files['csv']) as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 30 and float(rows[2]['valence']) == pytest.approx(0.02)
    assert float(rows[2]['true_arousal']) == pytest.approx(math.cos(0.4), abs=1e-6)
    with BagReader(files['bag']) as bag:
        assert bag.topics['/affect/valence_arousal'].count == 30
        assert bag.topics['/affect/ground_truth'].count == 30
        first = next(decoded for _, decoded in bag.messages(['/affect/valence_arousal']))
        assert first.modalities == 3 and first.header.stamp.sec == T0 // 10 ** 9
        assert first.header.frame_id == 'camera_optical'          # the camera's frame, kept
    for plot in ('va_plane.png', 'timeseries_s.png'):
        assert (tmp_path / plot).stat().st_size > 1000


def test_labels_from_topic_and_csv(tmp_path):
    store = affective_typestore()
    frames = [T0 + i * FRAME_NS for i in range(5)]
    with BagWriter(tmp_path / 'bag') as bag:
        bag.add_topic('/affect/ground_truth', VALENCE_AROUSAL)
        for i, stamp in enumerate(frames[:4]):  # the last frame has no label
            bag.write('/affect/ground_truth', stamp + 2_000_000, store.types[VALENCE_AROUSAL](
                header=make_header(stamp + 2_000_000), stream_id='default', roi=no_box(store),
                valence=0.1 * i, arousal=-0.1 * i, confidence=1.0, modalities=0))
    labels = labels_from_topic(tmp_path / 'bag', 'affect/ground_truth', frames)
    np.testing.assert_allclose(labels[:4, 0], [0.0, 0.1, 0.2, 0.3], atol=1e-6)
    assert np.isnan(labels[4]).all()
    assert labels_from_topic(tmp_path / 'bag', 'other/topic', frames) is None
    by_frame = tmp_path / 'frames.csv'
    by_frame.write_text('frame,valence,arousal\n0,0.5,-0.5\n3,1.0,1.0\n')
    labels = labels_from_csv(by_frame, frames)
    assert labels[0].tolist() == [0.5, -0.5] and labels[3].tolist() == [1.0, 1.0]
    assert np.isnan(labels[1]).all()
    by_stamp = tmp_path / 'stamps.csv'
    by_stamp.write_text(f'stamp,valence,arousal\n{(frames[2] + 1_000_000) / 1e9:.6f},0.25,0.75\n')
    assert labels_from_csv(by_stamp, frames)[2].tolist() == [0.25, 0.75]
    relative = tmp_path / 'relative.csv'   # seconds since the first frame, as for `prepare video`
    relative.write_text('time,valence,arousal\n0.0,0.1,0.2\n0.0333,0.3,0.4\n')
    labels = labels_from_csv(relative, frames)
    assert labels[1].tolist() == pytest.approx([0.3, 0.4]) and np.isnan(labels[3]).all()
    per_frame = tmp_path / 'per_frame.csv'
    per_frame.write_text('valence,arousal\n0.1,0.1\n-5,0.2\n')   # -5: unannotated (Aff-Wild2)
    labels = labels_from_csv(per_frame, frames)
    assert labels[0].tolist() == pytest.approx([0.1, 0.1]) and np.isnan(labels[1, 0])
    assert np.isnan(labels[2]).all()
    bad = tmp_path / 'bad.csv'
    bad.write_text('time,v,a\n0,0,0\n')
    with pytest.raises(ValueError, match="expected columns 'valence', 'arousal'"):
        labels_from_csv(bad, frames)
    outside = tmp_path / 'outside.csv'
    outside.write_text('frame,valence,arousal\n9,0,0\n')
    with pytest.raises(ValueError, match='outside'):
        labels_from_csv(outside, frames)


def test_label_matching_tolerance():
    video = np.array([0, 33_000_000, 66_000_000], np.int64)
    labels = _match_labels(np.array([1_000_000, 50_000_000], np.int64), np.array([[0.1, 0.1], [0.2, 0.2]]),
                           video, tolerance_s=0.010)
    assert labels[0].tolist() == pytest.approx([0.1, 0.1])
    assert np.isnan(labels[1]).all()                    # 17 ms from the nearest label
    assert np.isnan(labels[2]).all()


def test_bag_inputs_pick_topics_and_refuse_wrong_types(tmp_path):
    store = affective_typestore()
    with BagWriter(tmp_path / 'bag') as bag:
        bag.add_topic('/camera/image_raw', IMAGE)
        bag.add_topic('/speech', VALENCE_AROUSAL)   # wrong type on purpose
        bag.write('/camera/image_raw', T0, store.types[IMAGE](
            header=make_header(T0), height=1, width=1, encoding='rgb8', is_bigendian=0, step=3,
            data=np.zeros(3, np.uint8)))
    with BagReader(tmp_path / 'bag') as bag:
        with pytest.raises(BagError, match="no topic 'image_raw'"):
            bag_inputs(bag, BagTopics(), ['video'])
        inputs = bag_inputs(bag, BagTopics(image='camera/image_raw'), ['video', 'audio'])
        assert inputs == {'image': ('/camera/image_raw', IMAGE)}   # no audio recorded: audio not run
        with pytest.raises(BagError, match="'/speech' has type affective_msgs/msg/ValenceArousal"):
            bag_inputs(bag, BagTopics(image='camera/image_raw'), ['video', 'text'])
    assert STRING == 'std_msgs/msg/String'


def test_reports_say_when_a_replay_is_empty_or_has_no_ground_truth(tmp_path):
    empty = frame_table([], [], {}, {}, None)
    report = build_replay_report(empty, wall_s=0.5, mode='as fast as possible', encoders={},
                                 extra={'labels_looked_for': 'affect/ground_truth'})
    assert report['frames'] == 0 and report['frames_with_estimate'] == 0
    notices = report_notices(report)
    assert notices == ['EMPTY REPLAY: the bag has no video frames, so nothing was estimated or evaluated.']
    files = write_replay_report(tmp_path / 'empty', empty, report, title='Empty', session='e')
    text = files['markdown'].read_text()
    assert text.startswith('EMPTY REPLAY') and 'pretrained weights' not in text
    assert untrained_line({}).startswith('No encoder answered')

    frames = [T0 + i * FRAME_NS for i in range(10)]
    publish = {s: 0.05 * i for i, s in enumerate(frames)}
    unlabelled = frame_table(frames, _outputs(frames), publish, publish, None)
    report = build_replay_report(unlabelled, wall_s=1.0, mode='as fast as possible',
                                 encoders={'video': 'x@untrained'},
                                 extra={'labels_looked_for': 'affect/ground_truth'})
    notices = report_notices(report)
    assert notices[0].startswith('UNTRAINED encoders')
    assert notices[1].startswith('NO GROUND TRUTH: no labels for these frames in affect/ground_truth')
    files = write_replay_report(tmp_path / 'unlabelled', unlabelled, report, title='No truth', session='u')
    assert 'NO GROUND TRUTH' in files['markdown'].read_text().split('# No truth')[0]


def test_replay_refuses_at_start_what_it_cannot_evaluate(tmp_path):
    bag = tmp_path / 'bag'
    with pytest.raises(FileNotFoundError, match=r'checkpoint not found: .*missing.pt; train one with '
                                                r'`affective-trm demo`'):
        plan_replay(bag, tmp_path / 'missing.pt', ReplayOptions())
    checkpoint = tmp_path / 'present.pt'
    checkpoint.write_bytes(b'')   # refused before it is read
    options = ReplayOptions(parameters={'fusion': {'sync_policy': 'approximate'}})
    with pytest.raises(ValueError, match="sync_policy 'approximate' publishes only the frames it pairs"):
        plan_replay(bag, checkpoint, options)


def test_several_people_get_their_own_ground_truth_metrics_and_coverage(tmp_path):
    frames = [T0 + i * FRAME_NS for i in range(40)]
    publish = {s: 0.05 * i for i, s in enumerate(frames)}
    t = np.arange(40) / 40
    truth = {'face_0': np.stack([np.sin(6 * t), np.cos(6 * t)], axis=1),
             'face_1': np.stack([-np.sin(6 * t), 0.5 * np.cos(3 * t)], axis=1)}
    outputs = []
    for i, stamp in enumerate(frames):
        outputs.append((stamp, 'face_0', *(truth['face_0'][i] * 0.9), 0.8, 1, 1.0 + 0.05 * i))   # close
        if i % 2 == 0:   # face_1 seen on half the frames, estimated far from its truth
            outputs.append((stamp, 'face_1', *(-truth['face_1'][i]), 0.5, 1, 1.0 + 0.05 * i))
    assert estimate_streams(outputs) == ['face_0', 'face_1']
    tables = people_tables(frames, outputs, publish, publish, truth)
    assert list(tables) == ['face_0', 'face_1']
    np.testing.assert_allclose(tables['face_1'].truth, truth['face_1'], atol=1e-6)   # its own labels
    people = people_report(tables)
    first, second = people['people']['face_0'], people['people']['face_1']
    assert first['coverage'] == 1.0 and second['coverage'] == 0.5
    assert first['metrics']['valence']['ccc'] > 0.9 and second['metrics']['valence']['ccc'] < -0.9
    assert people['pooled_metrics']['valence']['n'] == 40 + 20
    assert second['metrics']['valence']['n'] == 20 and first['labelled_frames'] == 40
    # One person under another name than its labels: still that person's labels.
    single = people_tables(frames, [o for o in outputs if o[1] == 'face_0'], publish, publish,
                           {'default': truth['face_0']})
    np.testing.assert_allclose(single['face_0'].truth, truth['face_0'], atol=1e-6)
    report = build_replay_report(tables['face_0'], wall_s=2.0, mode='as fast as possible', encoders={})
    report.update(people=people['people'], metrics=people['pooled_metrics'], shown_person='face_0')
    files = write_replay_report(tmp_path, tables['face_0'], report, title='Two people', session='two')
    text = files['markdown'].read_text()
    assert '## People' in text and '| face_1 | 50.0 | 40 |' in text
    with BagReader(files['bag']) as bag:
        first_estimate = next(decoded for _, decoded in bag.messages(['/affect/valence_arousal']))
        assert first_estimate.stream_id == 'face_0'
