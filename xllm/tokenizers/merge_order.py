"""The order of BPE merges in a long word, shared by the merge loops of both tokenizers
(``sentencepiece._merge_by_score`` and ``ByteLevelBPE._merge_many``): the pair of lowest rank
first, the leftmost first among equals, each merge making new pairs with its neighbours.

The symbols form a doubly linked list over their first positions (``next_of``/``prev_of``),
ended on both sides by a sentinel that merges with nothing (index n, which is also index -1).
``rank_at[position]`` is the rank of the pair starting there (-1: none); a position queued
under another rank is stale and skipped. Pairs wait in one bucket per rank (``{rank:
[positions]}`` and a heap of those ranks); buckets are taken whole, lowest rank first, in
position order. A pair that a merge makes goes to the heap ``urgent`` of ``(rank, position)``
if its rank is lower than the bucket's (merged first), to its own bucket if it is higher; a
pair of the same rank (SentencePiece only: pieces of equal score) goes to the heap ``later``
of positions, merged in position order with the bucket.

``merge_positions`` hands out the pairs in that order; each tokenizer merges them and queues
the new pairs itself, with its own symbols (strings, or vocabulary numbers), because a call
back to the tokenizer for every pair slows SentencePiece's encode, which is nearly all
merging."""
from heapq import heappop


def merge_positions(end, rank_at, buckets, ranks, urgent, later):
    """Yield ``(position, rank of the bucket being taken)`` for each pair to merge, in order,
    until no pair is left. The caller merges the pair at ``position`` before the next one is
    chosen, and queues the pairs that merge makes: in ``urgent``, ``later`` or ``buckets`` (a
    new bucket's rank goes in the heap ``ranks``). ``end`` is the sentinel's position."""
    while ranks:
        current = heappop(ranks)
        todo = sorted(buckets.pop(current))
        todo.append(end)
        at = 0
        while True:
            if urgent:
                rank, left = heappop(urgent)
            elif later and later[0] < todo[at]:
                left = heappop(later)
                rank = current
            else:
                left = todo[at]
                if left >= end:
                    break
                at += 1
                rank = current
            if rank_at[left] == rank:  # else a stale entry
                yield left, current
