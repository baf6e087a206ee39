"""The steps of :func:`hf_specdef.publishing.publish.publish`, one module each.

* :mod:`.source`: what is being published (a local folder or a Hub id) and the metadata its card carries;
* :mod:`.components`: the torch models of a checkpoint folder, their protection records, stock loading;
* :mod:`.protect`: step 1, the protected copy of the folder;
* :mod:`.checks`: step 2, the checks that gate publication (function within tolerance, claims visibly deformed);
* :mod:`.card`: step 3, the model card;
* :mod:`.hub`: step 4, the token and the push;
* :mod:`.errors`: :class:`PublishError`, a refused publication.
"""
