"""Every random-stream tag of the platform, in one place.

A draw is ``SeedSequence([seed, TAG, ...])``: the tag keeps independent draws apart for the
same seed and client. Tags are never reused and never renumbered (a new value would change
every result drawn from it); a new workload takes the next free block of ten.
"""

from __future__ import annotations

# federation (workloads.federation) and the linear workloads' random models
TRUTH = 1  # true cluster models of mixed regression
BLOCK = 2  # per-block client draws (sizes, labels, features)
PARTICIPATION = 3  # which clients a round samples
DROPOUT = 4  # which sampled clients fail to reply
LINEAR_INIT = 5  # Workload.random_models' default draw (IFCA's random start)
AVAILABILITY = 6  # bernoulli availability trace
PHASE = 7  # diurnal trace: each client's phase
LATENCY = 8  # simulated client latency
SCALED_UPDATES = 9  # which clients send scaled updates (federation.scaled_update_fraction)

# active learning (workloads.active_learning)
AL_SPLIT = 11  # test/pool split and the Dirichlet draws
AL_SEED_SET = 12  # each client's initial labeled samples
AL_QUERY = 13  # the random rule's draws
AL_TRAIN = 14  # minibatch order of local training

# Koopman neural operators (workloads.koopman)
KOOPMAN_TRAIN_DATA = 21  # clients' trajectories
KOOPMAN_TEST_DATA = 22  # the server's held-out trajectories
KOOPMAN_TRAIN = 23  # minibatch order of local training
KOOPMAN_INIT = 24  # model initialisation

# backdoors through dataset distillation (workloads.backdoor)
BACKDOOR_SPLIT = 31  # train/test split and the shards
BACKDOOR_POISON = 32  # which of a malicious client's images are poisoned
BACKDOOR_TRIGGER = 33  # DOORPING's random initial trigger
BACKDOOR_NET = 34  # the fresh networks of DC iterations
BACKDOOR_INIT = 35  # the synthetic set's initial draw
BACKDOOR_SERVER = 36  # the server's victim model and its defenses

# cluster-guided contrastive graph clustering (workloads.ccgc)
CCGC_GRAPH = 41  # the contextual SBM
CCGC_SPLIT = 42  # who holds which nodes
CCGC_INIT = 43  # the encoders' initialisation
CCGC_CENTRES = 44  # the initial centres' node sample and k-means++
CCGC_SAMPLE = 45  # the positive pairs' sampling in local training

# multi-relational bot and stance detection (workloads.mgtab)
MGTAB_GRAPH = 51  # the MGTAB-schema generator
MGTAB_SPLIT = 52  # the 70/20/10 train/validation/test roles
MGTAB_PARTITION = 53  # who holds which users (random partition)
MGTAB_INIT = 54  # the models' initialisation (IFCA's draws too)
MGTAB_TRAIN = 55  # dropout in local training

# SNF-style filter pruning (workloads.snf)
SNF_SPLIT = 61  # test originals, the Dirichlet split, each client's validation set
SNF_INIT = 62  # the ResNet's initialisation
SNF_TRAIN = 63  # minibatch order and distortions of local training
SNF_VIEWS = 64  # the fixed distorted views (test, validation)
SNF_WIDTHS = 65  # the search's candidate widths and the random-widths baseline
SNF_CRITERION = 66  # the random filter choice (criterion = "random")

# imbalanced segmentation through neural collapse, CeCo (workloads.ceco)
CECO_DATA = 71  # each client's scenes
CECO_TEST = 72  # the server's class-balanced test scenes
CECO_INIT = 73  # the network's initialisation (IFCA's draws too)
CECO_TRAIN = 74  # minibatch order and flips of local training
CECO_ETF = 75  # the fixed simplex ETF (every client derives the same one from the seed)
# blind image quality, PMT-IQA (workloads.pmt_iqa)
IQA_DATA = 81  # the crops, the continuous strengths, the distortions' noise and the rater noise
IQA_SPLIT = 82  # who holds which training patches
IQA_INIT = 83  # the network's initialisation (IFCA's draws too)
IQA_TRAIN = 84  # minibatch order and flips of local training

# compressed-video quality, SSTAM (workloads.sstam)
SSTAM_CONTENT = 91  # each content's scene: photo window, motion, shapes, grain
SSTAM_CLIPS = 92  # which clips of the detector-training set train the temporal model, and its batches
SSTAM_TEMPORAL_INIT = 93  # the temporal attention model's initialisation
SSTAM_INIT = 94  # the quality regressor's initialisation (IFCA's draws too)
SSTAM_TRAIN = 95  # minibatch order of local training

# the platform, continued
ANCHORS = 101  # anchors.choice = "random": which clients are anchors
BERNOULLI_INIT = 102  # clustered.init = "bernoulli": IFCA's starting models


def all_tags() -> dict[str, int]:
    """Name -> tag of every stream (a test checks that no two share a value)."""
    return {n: v for n, v in globals().items() if n.isupper() and isinstance(v, int)}
