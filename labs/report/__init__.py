"""Step 05's report: result files in, tables, figures and one HTML (or Markdown) file out.

The report reads result files only, never live objects, and never imports torch: it
runs wherever the result files are copied (docs/results_format.md). It uses the
torch-free labs.contract, labs.fmt, labs.files and labs.bandwidth.

    loading      every *.json of the folder through labs.contract.load_result
    analysis     one row per run, one per configuration; baselines and efficiency (pandas)
    narrative    verdict, "what this shows", caveats and methodology, from the numbers
    environment  step 01's environment file and the machines the runs name
    plots        the figures (matplotlib, Agg)
    render       HTML (jinja2, autoescaped), Markdown and CSV
    output       where the files go, written atomically (labs.files), never over a file
                 that 05 did not write
"""
