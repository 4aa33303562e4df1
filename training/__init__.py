"""The two-stage BLIP-2 trainer (stage 1: ITC + ITM + ITG; stage 2: generative). Not built yet."""
