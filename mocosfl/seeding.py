"""The named random streams of mocosfl: every random draw is ``(seed, stream, *counters)``.

Randomness is derived from the config's seed, a stream id and counters (round, step, epoch) rather
than carried as generator state, so a run resumed from any checkpoint replays exactly. The ids are
part of every recorded result: changing one changes the numbers of every run that uses it.
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np
import torch


class Stream(IntEnum):
    PARTICIPANTS = 1  # (seed, 1, round): which clients take part in a round
    ROUND_ORDER = 2  # (seed, 2, round): each participant's shard order for the round
    AUGMENT = 3  # (seed, 3, step): the two augmented views of a step
    CENTRAL_EPOCH = 5  # (seed, 5, epoch): centralized MoCo's permutation of the pool
    QUEUE_INIT = 7  # (seed, 7): the key queue's initial random keys
    FLMOCO_QUEUE = 8  # (seed, 8, round): FL-MoCo's local queues, fresh each round
    TRAIN_SUBSET = 11  # (seed, 11): data.train_limit's slice of the training set
    TEST_SUBSET = 12  # (seed, 12): data.test_limit's slice of the test set
    KNN_BANK = 13  # (seed, 13): the kNN monitor's memory bank (training images)
    KNN_QUERIES = 14  # (seed, 14): the kNN monitor's queries (validation images)
    BENCH_AUGMENT = 99  # (seed, 99, i): images of the bench's augmentation timing
    VAL_SPLIT = 15  # (seed, 15): data.val_size's validation images, carved from the training set
    ATTACK_IMAGES = 21  # (seed, 21): the attacker's auxiliary training images and the victim test images
    ATTACK_SPLIT = 22  # (seed, 22): the auxiliary images' split into decoder training / validation
    ATTACK = 23  # (seed, 23, attack seed): one attack's decoder initialisation and batch order
    EXPERT_TARGET = 24  # (seed, 24): the clients' images a TAResSFL expert also trains on (taressfl.target_fraction)
    EXPERT_EPOCH = 25  # (seed, 25, source, epoch): the expert's permutation of its auxiliary (0) or target (1) images
    EXPERT_AUGMENT = 26  # (seed, 26, step): the expert's two augmented views of a step
    EXPERT_DECODER = 27  # (seed, 27): the expert's simulated attacker's initialisation


def rng(seed: int, stream: Stream, *counters: int) -> np.random.Generator:
    """A NumPy generator for one draw of ``stream`` at ``counters`` (e.g. the round)."""
    return np.random.default_rng([seed, int(stream), *counters])


def torch_generator(seed: int, stream: Stream, *counters: int) -> torch.Generator:
    """A CPU torch generator seeded from ``rng(seed, stream, *counters)``."""
    g = torch.Generator()
    g.manual_seed(int(rng(seed, stream, *counters).integers(2**62)))
    return g
