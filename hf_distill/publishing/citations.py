"""The paper of each distillation method, as the model cards cite it."""

from __future__ import annotations

# One entry per trainer's `method_name`: a short title, the paper, and its BibTeX.
METHODS: dict[str, dict[str, str]] = {
    "kd": {
        "title": "classic knowledge distillation",
        "paper": "Hinton et al., 2015, Distilling the Knowledge in a Neural Network",
        "url": "https://arxiv.org/abs/1503.02531",
        "bibtex": """@article{hinton2015distilling,
  title   = {Distilling the Knowledge in a Neural Network},
  author  = {Hinton, Geoffrey and Vinyals, Oriol and Dean, Jeff},
  journal = {arXiv preprint arXiv:1503.02531},
  year    = {2015}
}""",
    },
    # Our online trainer updates the teacher on alpha_t * KL(p_s || p_t) + (1 - alpha_t) * CE before each
    # student step: the ProKT baseline of the LGTM paper (not deep mutual learning's symmetric peers).
    "online": {
        "title": "online distillation (the teacher learns with the student, ProKT)",
        "paper": "Shi et al., 2021, Follow Your Path: a Progressive Method for Knowledge Distillation",
        "url": "https://arxiv.org/abs/2107.09305",
        "bibtex": """@inproceedings{shi2021follow,
  title     = {Follow Your Path: A Progressive Method for Knowledge Distillation},
  author    = {Shi, Wenxian and Song, Yuxuan and Zhou, Hao and Li, Bohan and Li, Lei},
  booktitle = {Machine Learning and Knowledge Discovery in Databases (ECML PKDD 2021)},
  year      = {2021}
}""",
    },
    "meta": {
        "title": "meta distillation (MetaDistil)",
        "paper": "Zhou et al., ACL 2022, BERT Learns to Teach: Knowledge Distillation with Meta Learning",
        "url": "https://aclanthology.org/2022.acl-long.485/",
        "bibtex": """@inproceedings{zhou2022bert,
  title     = {{BERT} Learns to Teach: Knowledge Distillation with Meta Learning},
  author    = {Zhou, Wangchunshu and Xu, Canwen and McAuley, Julian},
  booktitle = {Proceedings of the 60th Annual Meeting of the Association for Computational Linguistics},
  year      = {2022}
}""",
    },
    "lgtm": {
        "title": "LGTM (distillation influence)",
        "paper": "Ren et al., ACL 2023, Tailoring Instructions to Student's Learning Levels Boosts "
        "Knowledge Distillation",
        "url": "https://aclanthology.org/2023.acl-long.111/",
        "bibtex": """@inproceedings{ren2023tailoring,
  title     = {Tailoring Instructions to Student's Learning Levels Boosts Knowledge Distillation},
  author    = {Ren, Yuxin and Zhong, Zihan and Shi, Xingjian and Zhu, Yi and Yuan, Chun and Li, Mu},
  booktitle = {Proceedings of the 61st Annual Meeting of the Association for Computational Linguistics},
  year      = {2023}
}""",
    },
}
