"""MoE routing (gate) and the token all-to-all between the frontend and expert workers."""
