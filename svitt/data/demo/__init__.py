"""The embedded demo corpus (svitt.data.demo: scene, twins, ego, corpus): small synthetic videos whose captions depend on the order of events.

Every clip shows two coloured shapes; first one moves, then the other ("the red circle moves
left, then the blue square moves up"). Clips come in families of four built from two events
A = (object a, direction dA) and B = (object b, direction dB), all with the same start layout:

    fwd      A then B                          "the a moves dA, then the b moves dB"
    rev      fwd's frames in reverse order     "the b moves -dB, then the a moves -dA"
    swap     B then A (event-order twin)       "the b moves dB, then the a moves dA"
    swaprev  swap's frames in reverse order    "the a moves -dA, then the b moves -dB"

fwd/rev and swap/swaprev are time-reversed twins (identical frames, reversed), fwd/swap and
rev/swaprev are event-order twins. A model that ignores frame order scores exactly chance on the
time-reversed twins. The event of each half spans half the clip, so with T = 4 frames and
2-frame tubelets each tubelet sees one event's motion.

Downstream splits (families disjoint from the pretraining and test families): `finetune`, a
retrieval train split (retrieval_train.json), and `qa`, questions whose answers need the order of
events ("what moves first?", "which way does the blue square move?"), typed and with an answer list.

The egocentric part: long videos of a scene with three objects and the camera wearer's hand,
narrated every couple of seconds ("#C C lifts the red ball"), written as egoclip.csv and
egomcq.json in the official layouts, and Ego4D NLQ queries over clips of the same videos ("when
did I lift the red ball?", the answer window being that action) as nlq_train.json (the EgoClip
videos) and nlq_val.json (the held-out EgoMCQ videos).

Everything is deterministic from the seed (numpy Generator; libx264 single-threaded).
"""

from svitt.data.demo.corpus import make_demo_corpus
from svitt.data.demo.scene import DemoGeometry, DemoSizes

__all__ = ["DemoGeometry", "DemoSizes", "make_demo_corpus"]
