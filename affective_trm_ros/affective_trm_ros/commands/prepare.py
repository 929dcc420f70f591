"""`affective-trm prepare`: extract aligned per-frame features into a feature store.

    affective-trm prepare crema-d --root ~/data/CREMA-D --store features/crema_d
    affective-trm prepare video --video talk.mp4 --labels talk.csv --store features/mine
    affective-trm prepare video --video recordings/ --store features/mine        # name.mp4 + name.csv pairs
    affective-trm prepare bag --bag session_100 --store features/bags

Every source runs the encoder plugins, audio windowing and alignment the nodes run, configured
from the same parameter files (config/*.yaml, or --params-file). Sessions already in the store
are skipped, so an interrupted preparation resumes where it stopped.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from affective_trm_ros.core.modalities import FEATURE_ORDER

NODES = {modality: f'{modality}_encoder' for modality in FEATURE_ORDER}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('source', choices=('crema-d', 'video', 'bag'), help='what to prepare from')
    parser.add_argument(
        '--store', required=True, type=Path, help='feature store directory (created if absent)'
    )
    inputs = parser.add_argument_group('inputs')
    inputs.add_argument('--root', type=Path, help='crema-d: dataset folder holding AudioWAV/ and VideoFlash/')
    inputs.add_argument(
        '--limit', type=int, default=None, help='crema-d: only the first N clips (trial runs)'
    )
    inputs.add_argument(
        '--label-seed',
        type=int,
        default=0,
        help='crema-d: seed of the per-clip valence/arousal draws (default: 0)',
    )
    inputs.add_argument(
        '--video',
        type=Path,
        help='video: a video file with audio, or a folder of name.<video> + name.csv pairs',
    )
    inputs.add_argument(
        '--labels',
        type=Path,
        help='video/bag: per-frame label CSV (time,valence,arousal or valence,arousal per frame)',
    )
    inputs.add_argument(
        '--audio',
        type=Path,
        help="video: WAV file with the video's sound (default: the video's own audio track)",
    )
    inputs.add_argument('--transcript', type=Path, help='video: CSV time,text of the utterances')
    inputs.add_argument('--bag', type=Path, nargs='+', help='bag: rosbag2 directories')
    inputs.add_argument('--session-id', help='video/bag: session id (default: from the file name)')
    inputs.add_argument(
        '--speaker', help='video/bag: speaker id for speaker-independent splits (default: the session id)'
    )
    inputs.add_argument('--overwrite', action='store_true', help='re-extract sessions already in the store')
    encoders = parser.add_argument_group('encoders (default: the plugins configured for the nodes)')
    for modality in FEATURE_ORDER:
        encoders.add_argument(
            f'--{modality}-encoder',
            metavar='PLUGIN',
            help=f"{modality} encoder plugin id, or 'none' to leave {modality} out",
        )
    encoders.add_argument(
        '--params-file',
        type=Path,
        default=None,
        help='system parameter file (default: config/affective_trm.yaml)',
    )
    encoders.add_argument(
        '--allow-untrained',
        action='store_true',
        help='run encoders whose weights are missing with random weights (smoke tests only)',
    )
    encoders.add_argument(
        '--device', default='auto', help="encoders' device: auto, cpu, cuda (default: auto)"
    )
    parser.add_argument('--quiet', action='store_true', help='no progress bars')


def _settings(args):
    """The nodes' settings (plugins, options, windowing, alignment) with the command-line choices on top."""
    from affective_trm_ros.offline.extraction.bag import NodeSettings, node_parameters

    parameters = {}
    for modality, node in NODES.items():
        chosen = getattr(args, f'{modality}_encoder')
        if chosen == 'none':
            continue
        overrides = {'plugin': chosen} if chosen else {}
        if args.allow_untrained:
            overrides['allow_untrained'] = True
        parameters[node] = node_parameters(node, system_config=args.params_file, overrides=overrides)
    parameters['fusion'] = node_parameters('fusion', system_config=args.params_file)
    if not any(node in parameters for node in NODES.values()):
        raise ValueError('every encoder is set to none: at least one modality is needed')
    return NodeSettings.from_parameters(parameters)


def _open_store(path: Path, spec: list):
    from affective_trm_ros.offline.io.feature_store import FeatureStore

    return FeatureStore(path, encoder_spec=spec)


def _extractor(settings, encoders):
    from affective_trm_ros.offline.extraction.pipeline import ExtractionConfig, SessionExtractor

    config = ExtractionConfig(
        audio_window_s=settings.audio.window_s,
        audio_hop_s=settings.audio.hop_s,
        silence_threshold_dbfs=settings.audio.silence_threshold_dbfs,
        alignment=settings.alignment,
    )
    return SessionExtractor(encoders, config)


def run(args) -> int:
    from affective_trm_ros.core.encoders.base import WeightsNotFoundError

    try:
        settings = _settings(args)
        encoders = settings.load_encoders(args.device)
    except (WeightsNotFoundError, KeyError, ValueError) as error:
        print(f'prepare: {error}', file=sys.stderr)
        return 2
    untrained = [f'{m} ({e.identity})' for m, e in encoders.items() if e.untrained]
    if untrained:
        print(
            f'prepare: WARNING: untrained encoders: {", ".join(untrained)}; these features carry no '
            f'affect information',
            file=sys.stderr,
        )
    try:
        if args.source == 'crema-d':
            return _crema_d(args, settings, encoders)
        if args.source == 'video':
            return _video(args, settings, encoders)
        return _bag(args, settings, encoders)
    except (FileNotFoundError, ValueError, RuntimeError) as error:
        print(f'prepare: {error}', file=sys.stderr)
        return 1


def _crema_d(args, settings, encoders) -> int:
    from affective_trm_ros.offline.extraction.crema_d import prepare_crema_d

    if args.root is None:
        print('prepare crema-d: --root DIR is required', file=sys.stderr)
        return 2
    extractor = _extractor(settings, encoders)
    store = _open_store(args.store, extractor.spec)
    summary = prepare_crema_d(
        args.root, store, extractor, label_seed=args.label_seed, limit=args.limit, progress=not args.quiet
    )
    for problem in summary['problems'][:20]:
        print(f'  skipped: {problem}', file=sys.stderr)
    if len(summary['problems']) > 20:
        print(f'  ... and {len(summary["problems"]) - 20} more', file=sys.stderr)
    print(
        f'CREMA-D: {summary["clips"]} clips, {summary["written"]} written, {summary["skipped"]} already '
        f'in {args.store}, {len(summary["problems"])} files skipped'
    )
    return 0


def _video(args, settings, encoders) -> int:
    from tqdm.auto import tqdm

    from affective_trm_ros.offline.extraction.video_csv import discover_pairs, prepare_video

    if args.video is None:
        print('prepare video: --video FILE_OR_DIR is required', file=sys.stderr)
        return 2
    if args.video.is_dir():
        if args.labels or args.audio or args.transcript or args.session_id:
            print(
                'prepare video: with a folder, labels come from name.csv beside each video; '
                '--labels/--audio/--transcript/--session-id apply to a single video only',
                file=sys.stderr,
            )
            return 2
        pairs = [(video, labels, None, None, None) for video, labels in discover_pairs(args.video)]
    else:
        if args.labels is None:
            print('prepare video: --labels CSV is required for a single video', file=sys.stderr)
            return 2
        pairs = [(args.video, args.labels, args.audio, args.transcript, args.session_id)]
    extractor = _extractor(settings, encoders)
    store = _open_store(args.store, extractor.spec)
    written = 0
    for video, labels, audio, transcript, session_id in tqdm(pairs, desc='videos', disable=args.quiet):
        done = prepare_video(
            video,
            labels,
            store,
            extractor,
            session_id=session_id,
            speaker=args.speaker,
            audio_path=audio,
            transcript_path=transcript,
            overwrite=args.overwrite,
        )
        written += done is not None
    print(f'video: {len(pairs)} videos, {written} written, {len(pairs) - written} already in {args.store}')
    return 0


def _bag(args, settings, encoders) -> int:
    try:
        from affective_trm_ros.offline.extraction.bag import encoder_spec, prepare_bag
    except ImportError as error:
        print(f'prepare bag: rosbag preparation is unavailable ({error})', file=sys.stderr)
        return 1
    if not args.bag:
        print('prepare bag: --bag DIR [DIR ...] is required', file=sys.stderr)
        return 2
    if len(args.bag) > 1 and args.session_id:
        print('prepare bag: --session-id needs a single --bag', file=sys.stderr)
        return 2
    store = _open_store(args.store, encoder_spec(encoders))
    for bag in args.bag:
        result = prepare_bag(
            bag,
            store,
            encoders,
            settings.alignment,
            session_id=args.session_id,
            speaker=args.speaker,
            labels_csv=args.labels,
            audio=settings.audio,
            progress=not args.quiet,
            overwrite=args.overwrite,
        )
        state = 'already in the store' if result.skipped else 'written'
        print(f'{result.session_id}: {result.frames} frames, {result.labelled_frames} labelled ({state})')
    return 0
