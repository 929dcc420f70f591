"""Statistics over training seeds and held-out sessions: what every evaluation table reports.

A model is trained with several seeds and each trained copy predicts the same held-out sessions.
:func:`seed_session_statistics` turns those predictions into the numbers a report gives: per metric
the mean and sample sd over the seeds (each seed scored on all labelled frames of all sessions
pooled), every seed's own value, the mean CCC of each session (averaged over the seeds), and a
percentile-bootstrap 95 % confidence interval of the mean CCC that resamples *sessions*.
``affective-trm evaluate`` and the main job's report both use it.
"""

from __future__ import annotations

import numpy as np

from affective_trm_ros.core.metrics import DIMENSIONS, bootstrap_sessions_ci, ccc, mean_sd, regression_report

# Bootstrap resamples of the session CI and the seed of their draws: a fixed seed, so the same
# predictions always print the same interval.
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0
CI_LEVEL = 0.95
# Metrics summarised over seeds, per dimension and for the mean over the two dimensions.
SEED_METRICS = ('ccc', 'rmse', 'pearson')


def seed_session_statistics(runs: list, truths: list, session_ids: list, *,
                            resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> dict:
    """Mean +- sd over seeds and a bootstrap CI over sessions.

    ``runs[r][s]``: seed r's (T_s, 2) predictions of session ``session_ids[s]``; ``truths[s]``:
    its (T_s, 2) labels (NaN = unlabelled). Returns::

        {'valence' | 'arousal' | 'mean': {'<metric>_mean', '<metric>_sd', '<metric>_per_seed'}
                                          for metric in ccc, rmse, pearson,
         'ci95_mean_ccc': (low, high),   # sessions drawn with replacement, ``resamples`` draws
         'session_ccc': {session id: mean over seeds of the session's mean CCC},
         'seeds': number of runs}

    sd is NaN with one run (a sample sd needs two); the CI is NaN with fewer than two sessions.
    """
    if len(truths) != len(session_ids) or any(len(run) != len(truths) for run in runs):
        raise ValueError(f'every run needs one prediction per session: {len(session_ids)} sessions, '
                         f'{len(truths)} label arrays, runs of {sorted({len(run) for run in runs})} sessions')
    truths = [_pairs(t) for t in truths]
    runs = [[_pairs(p) for p in run] for run in runs]
    pooled_truth = np.concatenate(truths) if truths else np.zeros((0, 2))
    per_seed = [regression_report(np.concatenate(run), pooled_truth) for run in runs]
    entry: dict = {}
    for name in (*DIMENSIONS, 'mean'):
        entry[name] = {}
        for metric in SEED_METRICS:
            values = [report[name][metric] for report in per_seed]
            mean, sd = mean_sd(values)
            entry[name].update({f'{metric}_mean': mean, f'{metric}_sd': sd, f'{metric}_per_seed': values})
    entry['ci95_mean_ccc'] = bootstrap_sessions_ci(runs, truths, metric=mean_ccc, resamples=resamples,
                                                   level=CI_LEVEL, seed=seed)
    entry['seeds'] = len(runs)
    entry['session_ccc'] = {
        sid: mean_sd([mean_ccc(run[s], truths[s]) for run in runs])[0]
        for s, sid in enumerate(session_ids)
    }
    return entry


def mean_ccc(pred, true) -> float:
    """regression_report(pred, true)['mean']['ccc'] without the other metrics (the bootstrap calls it
    resamples x seeds times)."""
    return float(np.mean([ccc(pred[:, column], true[:, column]) for column in range(len(DIMENSIONS))]))


def _pairs(values) -> np.ndarray:
    return np.asarray(values, np.float64).reshape(-1, 2)
