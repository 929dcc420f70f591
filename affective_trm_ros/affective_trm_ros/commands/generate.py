"""`affective-trm generate`: write seeded sample sessions as rosbag2 recordings."""

from __future__ import annotations

import argparse
import time

from affective_trm_ros.offline.synthetic.sample_sessions import (
    HELDOUT_VOICES,
    SENTENCE_SETS,
    TRAINING_VOICES,
    VALIDATION_VOICES,
    SessionConfig,
    SpeechSynthesisError,
    espeak_available,
    generate_sessions,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = SessionConfig()
    parser.add_argument('out_dir', help='directory to write the sessions into (one bag directory each)')
    parser.add_argument('--sessions', type=int, default=1, help='number of sessions (default: 1)')
    parser.add_argument('--duration', type=float, default=defaults.duration_s,
                        help=f'seconds per session (default: {defaults.duration_s:g})')
    parser.add_argument('--seed', type=int, default=0,
                        help='seed of the first session; session k uses seed + k (default: 0)')
    parser.add_argument('--prefix', default='session', help="bag names: <prefix>_<seed> (default: 'session')")
    parser.add_argument('--storage', choices=('mcap', 'sqlite3'), default='mcap',
                        help='rosbag2 storage plugin (default: mcap)')
    parser.add_argument('--fps', type=float, default=defaults.fps, help='camera frame rate')
    parser.add_argument('--face-absent-fraction', type=float, default=defaults.face_absent_fraction,
                        help='share of the time the face is out of the frame')
    parser.add_argument('--speech-fraction', type=float, default=defaults.speech_fraction,
                        help='share of the time someone speaks')
    parser.add_argument('--occlusion-fraction', type=float, default=defaults.occlusion_fraction,
                        help='share of the time a hand covers the mouth or the eyes')
    parser.add_argument('--voice', default=defaults.voice,
                        help=f'espeak-ng voice (default: {defaults.voice}; training voices: '
                             f"{', '.join(TRAINING_VOICES)}; validation voices: "
                             f"{', '.join(VALIDATION_VOICES)}; held-out voices: {', '.join(HELDOUT_VOICES)})")
    parser.add_argument('--sentence-set', choices=tuple(SENTENCE_SETS), default=defaults.sentence_set,
                        help='sentence bank: training, validation or held-out sentences (no sentence is in '
                             'two of them)')
    parser.add_argument('--people', type=int, default=defaults.people,
                        help='faces side by side, each with its own script; ground truth per stream_id '
                             "(face_0, face_1, ... left to right; 'default' for one person)")
    parser.add_argument('--variety', action='store_true',
                        help='per-session distance, mirroring, tint, lighting level and speaking style')
    parser.add_argument('--overwrite', action='store_true', help='replace existing bags of the same name')
    parser.add_argument('--quiet', action='store_true', help='no progress bars')


def run(args: argparse.Namespace) -> int:
    if args.sessions < 1:
        print('--sessions must be >= 1')
        return 2
    if not espeak_available():
        print('error: espeak-ng is not installed; it synthesises the speech of the sample sessions.\n'
              '       Install it with: sudo apt-get install -y espeak-ng')
        return 1
    try:
        config = SessionConfig(duration_s=args.duration, fps=args.fps, storage=args.storage,
                               face_absent_fraction=args.face_absent_fraction,
                               speech_fraction=args.speech_fraction,
                               occlusion_fraction=args.occlusion_fraction,
                               voice=args.voice, sentence_set=args.sentence_set, people=args.people,
                               variety=args.variety)
    except ValueError as error:
        print(f'error: {error}')
        return 2
    started = time.perf_counter()
    try:
        summaries = generate_sessions(args.out_dir, args.sessions, config, first_seed=args.seed,
                                      prefix=args.prefix, overwrite=args.overwrite,
                                      progress=not args.quiet)
    except (SpeechSynthesisError, FileExistsError, RuntimeError) as error:
        print(f'error: {error}')
        return 1
    print(f'{"bag":40s} {"frames":>7s} {"absent":>7s} {"utterances":>10s}  quadrants (share of frames)')
    for summary in summaries:
        quadrants = ' '.join(f'{k} {v:.0%}' for k, v in summary.quadrant_share.items())
        print(f'{summary.path:40s} {summary.frames:7d} {summary.face_absent_frames:7d} '
              f'{summary.utterances:10d}  {quadrants}')
    print(f'wrote {len(summaries)} session(s) in {time.perf_counter() - started:.1f} s')
    return 0
