"""The papers' equations: one module per paper, beside the diffusion maths they share.

Plain functions (and small ``torch.nn`` modules) over tensors; nothing here imports threestudio.  The
threestudio adapters that call them are ``scoredistill.guidance.*_guidance`` (and, for HiFA, the
``hifa-system`` and the ``kernel-smoothed-volume-renderer``).

==============================================  ==================  ==============================================
paper                                           module              equations
==============================================  ==================  ==============================================
shared: DDPM / DDIM, CFG, Perp-Neg, SDS         :mod:`.diffusion`   forward process and DDIM (GE3D Eq. 1, 2, 6),
(DreamFusion)                                                       Tweedie x̂_0, CFG, Perp-Neg (GE3D supp.
                                                                    Eq. 17), SDS weights w(t) and gradient
GE3D, *Text-to-3D Generation by 2D Editing*     :mod:`.ge3d`        Alg. 1, Eq. 6, DBC Eq. 9-10, loss Eq. 11
LODS, *Learn to Optimize Denoising Scores*      :mod:`.lods`        Alg. 1-3, Eq. 6-10
DreamMapping (VDM + DCA)                        :mod:`.vdm`         Eq. 12-13 (operator), 17, 18, 19
UDS, *Rethinking SDS for 3D Edit and            :mod:`.uds`         Eq. 5, 10, 14-17, 19, Alg. 1
Generation*
HiFA, *High-fidelity Text-to-3D Generation*     :mod:`.hifa`        SDS+ Eq. 2-4, annealing Eq. 5, z-variance
                                                                    Eq. 6-8, kernel smoothing Sec. 4.2,
                                                                    disparity regularisation A.1
==============================================  ==================  ==============================================

Names: the code uses diffusers' / threestudio's terms, each paper's symbols appear in the docstrings:
``latents`` (z, x_0), ``latents_noisy`` (z_t, x_t), ``noise`` (ε), ``noise_pred_text`` / ``noise_pred_uncond``
(ε_φ(z_t, t, y) / ε_φ(z_t, t, ∅)), ``noise_pred`` (the guided ε̃_φ), ``alphas_cumprod`` (ᾱ), ``t`` / ``timestep``.
"""
