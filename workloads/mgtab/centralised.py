"""One model trained on a whole graph (MGTAB's protocol), and the metrics of every run.

``train_centralised``: full-batch AdamW for ``epochs`` epochs on the training users; after
every epoch the validation macro-F1 is measured and the test metrics of the epoch with the
best one are reported (the checkpoint chosen on validation macro-F1, never on accuracy,
which lets a model settle on the majority class). ``scores``: accuracy and macro-F1 of
both tasks, with sklearn's argument order (truth first; MGTAB's code swaps them).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from sklearn.metrics import accuracy_score, f1_score

from workloads.mgtab.data import TEST, TRAIN, VAL, AccountGraph
from workloads.mgtab.model import Graph, build_graph, build_model, joint_loss

SELECT_ON = ("mean", "bot", "stance")


def scores(y_bot: np.ndarray, y_stance: np.ndarray, bot_pred: np.ndarray, stance_pred: np.ndarray,
           prefix: str = "") -> dict[str, float]:
    """Accuracy and macro-F1 of both tasks (truth first, as sklearn expects)."""
    return {
        f"{prefix}acc_bot": float(accuracy_score(y_bot, bot_pred)),
        f"{prefix}f1_bot": float(f1_score(y_bot, bot_pred, average="macro", labels=[0, 1], zero_division=0)),
        f"{prefix}acc_stance": float(accuracy_score(y_stance, stance_pred)),
        f"{prefix}f1_stance": float(f1_score(y_stance, stance_pred, average="macro", labels=[0, 1, 2],
                                             zero_division=0)),
    }


def selection_score(metrics: dict[str, float], select_on: str, prefix: str = "val_") -> float:
    """The validation macro-F1 a checkpoint is chosen on (bot, stance or their mean)."""
    if select_on == "bot":
        return metrics[f"{prefix}f1_bot"]
    if select_on == "stance":
        return metrics[f"{prefix}f1_stance"]
    return 0.5 * (metrics[f"{prefix}f1_bot"] + metrics[f"{prefix}f1_stance"])


def predict(model: torch.nn.Module, x: torch.Tensor, graph: Graph) -> tuple[np.ndarray, np.ndarray]:
    model.eval()
    with torch.no_grad():
        bot, stance = model(x, graph)
    return bot.argmax(1).numpy(), stance.argmax(1).numpy()


@dataclass
class CentralRun:
    metrics: dict[str, float]  # test metrics at the chosen epoch, val_* at it, epoch
    curve: list[float] = field(default_factory=list)  # validation selection score per epoch


def train_centralised(graph: AccountGraph, split: np.ndarray, *, model: str, relations: list[int], hidden: int,
                      epochs: int, lr: float, weight_decay: float, stance_weight: float, seed: int,
                      select_on: str = "mean") -> CentralRun:
    """MGTAB's protocol on the whole graph (module docstring)."""
    torch.manual_seed(seed)
    net = build_model(model, graph.features.shape[1], hidden, len(relations))
    g = build_graph(graph.num_nodes, graph.edge_index, graph.edge_type, relations)
    x = torch.as_tensor(graph.features)
    y_bot, y_stance = torch.as_tensor(graph.y_bot), torch.as_tensor(graph.y_stance)
    train = torch.as_tensor(np.flatnonzero(split == TRAIN))
    val, test = split == VAL, split == TEST
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    best, run = -1.0, CentralRun({})
    for epoch in range(1, epochs + 1):
        net.train()
        bot, stance = net(x, g)
        loss = joint_loss(bot[train], stance[train], y_bot[train], y_stance[train], stance_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bp, sp = predict(net, x, g)
        v = scores(graph.y_bot[val], graph.y_stance[val], bp[val], sp[val], "val_")
        score = selection_score(v, select_on)
        run.curve.append(score)
        if score > best:
            best = score
            run.metrics = {**scores(graph.y_bot[test], graph.y_stance[test], bp[test], sp[test]), **v,
                           "epoch": epoch}
    return run
