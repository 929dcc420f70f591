"""`affective-trm prepare`: extract aligned per-frame features into a feature store.

    affective-trm prepare crema-d --root ~/data/CREMA-D --store features/crema_d --encoders offline
    affective-trm prepare video --video talk.mp4 --labels talk.csv --store features/mine
    affective-trm prepare video --video recordings/ --store features/mine        # name.mp4 + name.csv pairs
    affective-trm prepare bag --bag session_100 --store features/bags

Every source runs the encoder plugins, audio windowing and alignment the nodes run, configured
from the same parameter files (config/*.yaml, or --params-file). Sessions already in the store
are skipped, so an interrupted preparation resumes where it stopped. Inputs are checked before
any encoder loads; a file that cannot be read is skipped, listed with the reason, and the run
goes on.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from affective_trm_ros.commands.encoder_options import add_encoder_arguments

SOURCES = {
    'crema-d': 'CREMA-D as published: AudioWAV/<clip>.wav + VideoFlash/<clip>.flv',
    'video': 'your own recordings: a video with audio + a per-frame label CSV (or a folder of pairs)',
    'bag': 'rosbag2 recordings of the robot topics (image_raw, audio, speech, affect/ground_truth)',
}


class InputError(ValueError):
    """A command-line input that cannot work (missing folder, file, option); checked before encoders load."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sources = parser.add_subparsers(dest='source', metavar='SOURCE', required=True)
    crema = _source_parser(sources, 'crema-d', parser.formatter_class)
    crema.add_argument('--root', type=Path, required=True,
                       help='dataset folder holding AudioWAV/ and VideoFlash/')
    crema.add_argument('--limit', type=int, default=None, help='only the first N clips (trial runs)')
    crema.add_argument('--label-seed', type=int, default=0,
                       help='seed of the per-clip valence/arousal draws (default: 0)')
    video = _source_parser(sources, 'video', parser.formatter_class)
    video.add_argument('--video', type=Path, required=True,
                       help='a video file with audio, or a folder of name.<video> + name.csv pairs')
    video.add_argument('--labels', type=Path,
                       help='per-frame label CSV (time,valence,arousal or valence,arousal per frame)')
    video.add_argument('--audio', type=Path,
                       help="WAV file with the video's sound (default: its own audio track)")
    video.add_argument('--transcript', type=Path, help='CSV time,text of the utterances')
    video.add_argument('--session-id', help='session id (default: from the file name)')
    video.add_argument('--speaker',
                       help='speaker id for speaker-independent splits (default: the session id)')
    bag = _source_parser(sources, 'bag', parser.formatter_class)
    bag.add_argument('--bag', type=Path, nargs='+', required=True, help='rosbag2 directories')
    bag.add_argument('--labels', type=Path,
                     help='per-frame label CSV (default: the affect/ground_truth topic)')
    bag.add_argument('--session-id', help='session id (a single --bag; default: the bag folder name)')
    bag.add_argument('--speaker', help='speaker id for speaker-independent splits (default: the session id)')


def _source_parser(sources, name: str, formatter_class) -> argparse.ArgumentParser:
    parser = sources.add_parser(name, help=SOURCES[name], description=SOURCES[name],
                                formatter_class=formatter_class)
    parser.add_argument('--store', required=True, type=Path,
                        help='feature store directory (created if absent)')
    if name != 'crema-d':
        parser.add_argument('--overwrite', action='store_true',
                            help='re-extract sessions already in the store')
    add_encoder_arguments(parser)
    parser.add_argument('--params-file', type=Path, default=None,
                        help='system parameter file (default: config/affective_trm.yaml)')
    parser.add_argument('--device', default='auto', help="encoders' device: auto, cpu, cuda (default: auto)")
    parser.add_argument('--quiet', action='store_true', help='no progress bars')
    return parser


def run(args) -> int:
    from affective_trm_ros.commands.encoder_options import EncodersUnavailable, load_encoders, untrained_line

    try:
        inputs = _check_inputs(args)
        settings, notes = _settings(args)
    except (InputError, FileNotFoundError, KeyError, ValueError) as error:
        print(f'prepare {args.source}: {_message(error)}', file=sys.stderr)
        return 2
    for note in notes:
        print(f'prepare: {note}', file=sys.stderr)
    try:
        encoders = load_encoders(settings.encoder_parameters, device=args.device)
    except EncodersUnavailable as error:
        print(f'prepare: {error}', file=sys.stderr)
        return 2
    except (KeyError, ValueError) as error:
        print(f'prepare: {_message(error)}', file=sys.stderr)
        return 2
    try:
        video_path = settings.video_path(encoders)
        if video_path is not None:
            video_path.make_faces()  # a plugin that cannot run the configured face path fails now
    except ValueError as error:
        print(f'prepare: {error}', file=sys.stderr)
        return 2
    print(untrained_line(encoders), file=sys.stderr)
    store, created = _open_store(args.store, encoders)
    store.update_info(encoders={m: e.identity for m, e in encoders.items()})
    try:
        if args.source == 'crema-d':
            status = _crema_d(args, inputs, settings, encoders, store)
        elif args.source == 'video':
            status = _video(args, inputs, settings, encoders, store)
        else:
            status = _bag(args, inputs, settings, encoders, store)
    except (FileNotFoundError, ValueError, RuntimeError) as error:
        print(f'prepare {args.source}: {_message(error)}', file=sys.stderr)
        status = 1
    finally:
        if created:
            _remove_if_empty(store)
    if len(store):  # what training compares against: the content hash and the thread count
        from affective_trm_ros.offline.extraction.pipeline import record_store_provenance

        record_store_provenance(store)
    return status


def _message(error: Exception) -> str:
    return str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)


# ---------------------------------------------------------------- before any encoder loads

def _check_inputs(args):
    """The source's inputs, checked (and listed) without loading an encoder."""
    if args.source == 'crema-d':
        from affective_trm_ros.offline.extraction.crema_d import discover_clips

        clips, problems = discover_clips(args.root)
        if args.limit is not None:
            clips = clips[:args.limit]
        if not clips:
            listed = ''.join(f'\n  skipped: {p}' for p in problems)
            raise InputError(f'no usable clip under {args.root} (AudioWAV/<clip>.wav with a '
                             f'VideoFlash/<clip>.flv); {len(problems)} file(s) skipped{listed}')
        return clips, problems
    if args.source == 'video':
        return _video_inputs(args)
    return _bag_inputs(args)


def _video_inputs(args) -> list:
    from affective_trm_ros.offline.extraction.video_csv import discover_pairs, read_label_csv

    if not args.video.exists():
        raise InputError(f'--video {args.video} does not exist')
    if args.video.is_dir():
        if args.labels or args.audio or args.transcript or args.session_id:
            raise InputError('with a folder, labels come from name.csv beside each video; '
                             '--labels/--audio/--transcript/--session-id apply to a single video only')
        return [(video, labels, None, None, None) for video, labels in discover_pairs(args.video)]
    if args.labels is None:
        raise InputError('--labels CSV is required for a single video')
    given = (('--labels', args.labels), ('--audio', args.audio), ('--transcript', args.transcript))
    for option, path in given:
        if path is not None and not path.is_file():
            raise InputError(f'{option} {path} does not exist')
    read_label_csv(args.labels)  # a malformed label file fails here, naming the file and line
    return [(args.video, args.labels, args.audio, args.transcript, args.session_id)]


def _bag_inputs(args) -> list:
    if len(args.bag) > 1 and args.session_id:
        raise InputError('--session-id needs a single --bag')
    missing = [str(bag) for bag in args.bag if not bag.is_dir()]
    if missing:
        raise InputError(f"no rosbag2 directory at {', '.join(missing)}")
    if args.labels is not None and not args.labels.is_file():
        raise InputError(f'--labels {args.labels} does not exist')
    return list(args.bag)


def _settings(args):
    """The nodes' settings (plugins, options, windowing, alignment) with the command-line choices on top."""
    from affective_trm_ros.commands.encoder_options import encoder_node_parameters
    from affective_trm_ros.core.modalities import FEATURE_ORDER
    from affective_trm_ros.offline.extraction.settings import NodeSettings, node_parameters

    if args.params_file is not None and not args.params_file.is_file():
        raise InputError(f'--params-file {args.params_file} does not exist')
    base = {f'{m}_encoder': node_parameters(f'{m}_encoder', system_config=args.params_file)
            for m in FEATURE_ORDER}
    parameters, notes = encoder_node_parameters(args, base)
    parameters['fusion'] = node_parameters('fusion', system_config=args.params_file)
    return NodeSettings.from_parameters(parameters), notes


def _open_store(path: Path, encoders: dict):
    """(store, created): the store, and whether this run created it (so an empty one can go again)."""
    from affective_trm_ros.offline.extraction.pipeline import encoder_spec
    from affective_trm_ros.offline.io.feature_store import INDEX_NAME, FeatureStore

    created = not (path / INDEX_NAME).exists()
    return FeatureStore(path, encoder_spec=encoder_spec(encoders)), created


def _remove_if_empty(store) -> None:
    """A store this run created and left without sessions is removed, so the next run starts clean."""
    from affective_trm_ros.offline.io.feature_store import INDEX_NAME, SESSIONS_DIR

    if len(store):
        return
    (store.root / INDEX_NAME).unlink(missing_ok=True)
    for folder in (store.root / SESSIONS_DIR, store.root):
        try:
            folder.rmdir()  # only when empty: never removes anything else the folder holds
        except OSError:
            break


def _extractor(settings, encoders):
    from affective_trm_ros.offline.extraction.pipeline import ExtractionConfig, SessionExtractor

    config = ExtractionConfig(
        audio_window_s=settings.audio.window_s,
        audio_hop_s=settings.audio.hop_s,
        silence_threshold_dbfs=settings.audio.silence_threshold_dbfs,
        alignment=settings.alignment,
    )
    return SessionExtractor(encoders, config, video_path=settings.video_path(encoders))


def _print_problems(problems: list) -> None:
    for problem in problems:
        print(f'  skipped: {problem}', file=sys.stderr)


# ---------------------------------------------------------------- sources

def _crema_d(args, inputs, settings, encoders, store) -> int:
    from affective_trm_ros.offline.extraction.crema_d import prepare_crema_d

    clips, problems = inputs
    summary = prepare_crema_d(args.root, store, _extractor(settings, encoders), label_seed=args.label_seed,
                              progress=not args.quiet, clips=clips, problems=problems)
    _print_problems(summary['problems'])
    print(f'CREMA-D: {summary["clips"]} clips, {summary["written"]} written, {summary["skipped"]} already '
          f'in {args.store}, {len(summary["problems"])} files skipped')
    return 0 if summary['written'] + summary['skipped'] else 1


def _video(args, pairs, settings, encoders, store) -> int:
    from tqdm.auto import tqdm

    from affective_trm_ros.offline.extraction.video_csv import prepare_video
    from affective_trm_ros.offline.io.media import MediaError

    extractor = _extractor(settings, encoders)
    written, problems = 0, []
    for video, labels, audio, transcript, session_id in tqdm(pairs, desc='videos', disable=args.quiet):
        try:
            done = prepare_video(video, labels, store, extractor, session_id=session_id, speaker=args.speaker,
                                 audio_path=audio, transcript_path=transcript, overwrite=args.overwrite)
        except (MediaError, ValueError) as error:  # one bad recording skips that recording, not the run
            problems.append(f'{video.name}: {error}')
            continue
        if done is not None:
            written += 1
            fraction = store.load(done).meta.get('labelled_fraction', 0.0)
            print(f'{done}: {store.num_frames(done)} frames, {100 * fraction:.1f} % labelled')
    _print_problems(problems)
    already = len(pairs) - written - len(problems)
    print(f'video: {len(pairs)} videos, {written} written, {already} already in {args.store}, '
          f'{len(problems)} skipped')
    return 0 if written + already else 1


def _bag(args, bags, settings, encoders, store) -> int:
    try:
        from affective_trm_ros.offline.extraction.bag import prepare_bag_sessions
    except ImportError as error:
        print(f'prepare bag: rosbag preparation is unavailable ({error})', file=sys.stderr)
        return 1
    problems, prepared = [], 0
    video_path = settings.video_path(encoders)
    for bag in bags:
        try:
            results = prepare_bag_sessions(bag, store, encoders, settings.alignment,
                                           session_id=args.session_id, speaker=args.speaker,
                                           labels_csv=args.labels, audio=settings.audio,
                                           progress=not args.quiet, overwrite=args.overwrite,
                                           video_path=video_path)
        except (RuntimeError, ValueError) as error:  # BagError, LabelCoverageError: this bag only
            problems.append(f'{bag}: {error}')
            continue
        prepared += len(results)
        for result in results:
            state = 'already in the store' if result.skipped else 'written'
            fraction = result.labelled_frames / max(result.frames, 1)
            print(f'{result.session_id}: {result.frames} frames, {result.labelled_frames} labelled '
                  f'({100 * fraction:.1f} %) ({state})')
    _print_problems(problems)
    return 0 if prepared else 1
