"""`affective-trm`: one command line for the offline work (data, training, evaluation, replay, weights).

Each subcommand lives in ``affective_trm_ros.commands.<module>`` and exposes
``add_arguments(parser)`` and ``run(args) -> int``. Modules are imported only when their
subcommand runs, so ``affective-trm --help`` stays fast and a missing optional dependency of
one subcommand does not break the others.
"""

import argparse
import importlib
import sys

# subcommand -> (module under affective_trm_ros.commands, one-line help)
COMMANDS = {
    'demo': ('demo', 'the main job: sample sessions -> features -> training -> replay through the '
                     'nodes -> report (or --live on a robot)'),
    'generate': ('generate', 'write seeded sample sessions as rosbag2 (MCAP) recordings'),
    'prepare': ('prepare', 'extract aligned per-frame features into a feature store '
                           '(bags, CREMA-D, video + CSV)'),
    'train': ('train', 'train the stateful TRM (or a baseline) on a feature store'),
    'evaluate': ('evaluate', 'evaluate a checkpoint on a feature-store split: metrics, plots, report'),
    'replay': ('replay', 'replay a rosbag through the real nodes and write the evaluation report'),
    'run': ('run', 'run the nodes in one process from the launch YAML (no ros2 launch needed)'),
    'weights': ('weights', 'list, check and fetch pretrained weight files'),
    'benchmark': ('benchmark', 'timing benchmarks: model step, encoders, fusion'),
    'temporal-benchmark': ('temporal_benchmark', 'the synthetic temporal benchmark: stateful TRM '
                                                 'vs memoryless MLP, GRU and seed TRM'),
}


class HelpFormatter(argparse.HelpFormatter):
    """Help that shows every option's default (unless its text already states one, or it has none)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ''
        if (not action.option_strings or '%(default)' in text or 'default' in text.lower()
                or action.default in (None, False, argparse.SUPPRESS) or action.default == []):
            return text
        return f'{text} (default: %(default)s)'


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='affective-trm', description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest='command', metavar='COMMAND', required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(_module=module_name)
        # Arguments are added lazily (below) for the chosen subcommand only.
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv and argv[0] in COMMANDS:
        module = importlib.import_module(f'affective_trm_ros.commands.{COMMANDS[argv[0]][0]}')
        sub = argparse.ArgumentParser(prog=f'affective-trm {argv[0]}', description=COMMANDS[argv[0]][1],
                                      formatter_class=HelpFormatter)
        module.add_arguments(sub)
        args = sub.parse_args(argv[1:])
        try:
            return int(module.run(args) or 0)
        except KeyboardInterrupt:
            print('interrupted', file=sys.stderr)
            return 130
    parser.parse_args(argv)  # prints help / usage errors
    return 2


if __name__ == '__main__':
    sys.exit(main())
