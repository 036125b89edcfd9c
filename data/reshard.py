"""Resuming the train stream with another data-parallel size or number of workers.

A rank's state (TrainStream.state_dict) only holds its own readers' positions, which mean
something only under the layout (dp_size, num_workers) that produced them. To change the
layout, collect the states of ALL ranks and merge them:

    merged = merge_rank_states([state_of_rank_0, state_of_rank_1, ...])
    stream = build_train_stream(args, seq_len, mbs, dp_rank=r, dp_size=new_dp, seed=seed)
    stream.load_state_dict(merged)          # on every new rank

The merged state is kept per shard: every (epoch, shard) of the epochs in progress that some old
reader had not finished, with the position inside it (partially read shards continue at the
document and token where they stopped). These work items are dealt round-robin to the new
layout's readers, which do them first; then every new reader starts its regular schedule at the
epoch after the last one in progress. So no document is repeated or skipped. Bad-data counters
are summed (into rank 0's first reader), and the MLM draw gets a new generation so it does not
replay earlier draws.
"""

from __future__ import annotations

from data.stream import initial_state, shard_order

MERGED_KIND = "merged"
LAYOUT_KEYS = ("dp_rank", "dp_size", "num_workers")


def merge_rank_states(states: list[dict]) -> dict:
    """The states of all ranks of one layout -> one layout-free state (see module doc)."""
    if not states:
        raise ValueError("merge_rank_states needs the data states of all dp ranks, got none")
    orders = [s["order"] for s in states]
    dp_size = orders[0]["dp_size"]
    if sorted(o["dp_rank"] for o in orders) != list(range(dp_size)):
        ranks = sorted(o["dp_rank"] for o in orders)
        raise ValueError(f"merge_rank_states needs one state per dp rank 0..{dp_size - 1}: {ranks}")
    common = {k: v for k, v in orders[0].items() if k not in LAYOUT_KEYS}
    for o in orders:
        for key, value in common.items():
            if o.get(key) != value:
                raise ValueError(f"the rank states disagree on {key}: {value!r} vs {o.get(key)!r}")
        if o["dp_size"] != dp_size:
            raise ValueError("the rank states come from different dp sizes")
    n_shards, shuffle = common["shards"], common["shuffle_shards"]
    data_seed, seed = common["data_seed"], common["seed"]
    readers = [(o, r) for o, s in zip(orders, states, strict=True) for r in s["readers"]]
    last_epoch = max(r["epoch"] for _, r in readers)
    items: list[list[int]] = []
    for order, r in readers:
        items += [list(item) for item in r["pending"]]
        n_readers = max(1, order["num_workers"])
        for epoch in range(r["epoch"], last_epoch + 1):
            all_shards = shard_order(n_shards, shuffle, data_seed, seed, epoch)
            shards = all_shards[order["dp_rank"] :: dp_size][r["reader"] :: n_readers]
            if epoch > r["epoch"]:
                items += [[epoch, shard, 0, 0, 0] for shard in shards]
                continue
            pos = r["shard_pos"]
            if pos < len(shards):
                opened = int([epoch, pos] <= r["opened"])
                items.append([epoch, shards[pos], r["doc_index"], r["offset"], opened])
            items += [[epoch, shard, 0, 0, 0] for shard in shards[pos + 1 :]]
    rank_in_epoch = {}
    for epoch in {item[0] for item in items}:
        order_e = shard_order(n_shards, shuffle, data_seed, seed, epoch)
        rank_in_epoch.update({(epoch, shard): i for i, shard in enumerate(order_e)})
    items.sort(key=lambda item: (item[0], rank_in_epoch[item[0], item[1]]))
    return {
        "version": states[0]["version"],
        "kind": MERGED_KIND,
        "order": common,
        "pending": items,
        "next_epoch": last_epoch + 1,
        "generation": 1 + max(r.get("generation", 0) for _, r in readers),
        "skipped_samples": sum(r["skipped_samples"] for _, r in readers),
        "skipped_shards": sum(r["skipped_shards"] for _, r in readers),
    }


def reader_states_from_merged(
    merged: dict, dp_rank: int, dp_size: int, num_readers: int
) -> list[dict]:
    """This rank's reader states under the new layout, from a merged state."""
    total = dp_size * num_readers
    states = []
    for w in range(num_readers):
        g = dp_rank * num_readers + w
        st = initial_state(w)
        st["pending"] = [list(item) for item in merged["pending"][g::total]]
        st["epoch"] = merged["next_epoch"]
        st["generation"] = merged["generation"]
        if g == 0:
            st["skipped_samples"] = merged["skipped_samples"]
            st["skipped_shards"] = merged["skipped_shards"]
        states.append(st)
    return states
