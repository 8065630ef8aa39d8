"""Classical recommenders behind the interface our model is evaluated through.

  model = ItemKNN(k=100, shrink=20).fit(data)         # train split only
  queries = data.queries("test", d)
  scores = model.score_catalog(queries, d)             # [n, N_d]
  evaluate_ranking(scores, queries, data, d)           # HR@10, NDCG@10, AUC

Explicit ("rating") domains: ItemMean, UserItemBias, BiasedMF, AutoRec (``score_pairs`` is the
predicted rating). Ranking: Popularity, ItemKNN, EASE, BPR, and TextKNN (content-based, on
text vectors). ``tune`` grid-searches any of them
on a validation split (``holdout_split`` makes one from train).
"""

from crossrec_jax.baselines.base import (Recommender, domain_exclusions, evaluate_ranking,
                                         evaluate_rating, holdout_split, ranking_metric,
                                         rmse_metric, tune)
from crossrec_jax.baselines.content import TextKNN
from crossrec_jax.baselines.ranking import (BPR, EASE, ItemCooccurrence, ItemKNN, Popularity,
                                            ease_weights)
from crossrec_jax.baselines.rating import (ITEM_MEAN_SHRINK, AutoRec, BiasedMF, ItemMean,
                                           RatingRecommender, RatingTerms, UserItemBias,
                                           fit_biases, shrunk_item_means)

__all__ = ["Recommender", "RatingRecommender", "RatingTerms", "domain_exclusions",
           "evaluate_ranking", "evaluate_rating", "holdout_split", "ranking_metric", "rmse_metric",
           "tune", "BPR", "EASE", "ItemCooccurrence", "ItemKNN", "Popularity", "TextKNN",
           "ease_weights",
           "ITEM_MEAN_SHRINK", "AutoRec", "BiasedMF", "ItemMean", "UserItemBias", "fit_biases",
           "shrunk_item_means"]
